"""Quality of generated images: Frechet distance in a feature space, and class accuracy by a judge.

Numpy only (no torch). The Frechet distance takes features from any extractor, a callable
``images [N,C,H,W] in [0,1] -> features [N,D]``: the shipped digit judge's hidden layer for ``digits``
("FID-digits"), or a user's Inception network for ImageNet DiTs (see :func:`inception_features`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from ditq.errors import DitqError, one_line
from ditq.weights import read_tensors

FeatureFn = Callable[[np.ndarray], np.ndarray]


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` [N, D], float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape [N, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    ``tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), which avoids a non-symmetric
    matrix square root and its complex round-off.
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt, 0.0))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between two feature sets."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


@dataclass
class DigitJudge:
    """The shipped digit classifier: a two-hidden-layer ReLU MLP over the 64 pixels in [0, 1].

    ``features`` is the last hidden layer (the space of FID-digits); ``predict`` the class.
    """

    layers: list[tuple[np.ndarray, np.ndarray]]  # (W [in, out], b [out]) per layer

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DigitJudge":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path) if path else default_judge_path()
        if not path.is_file():
            raise DitqError(f"digit judge not found: {path} (run `make train-digits` to recreate it)")
        try:
            t = load_file(str(path))
            n = len([k for k in t if k.startswith("w")])
            return cls([(t[f"w{i}"].astype(np.float32), t[f"b{i}"].astype(np.float32)) for i in range(n)])
        except (SafetensorError, KeyError, OSError) as e:
            raise DitqError(f"{path}: corrupt digit judge ({e})") from None

    def _hidden(self, images: np.ndarray) -> np.ndarray:
        h = np.asarray(images, np.float32).reshape(len(images), -1)
        if not np.isfinite(h).all():  # NaN logits argmax to class 0: no verdict on such images
            bad = int((~np.isfinite(h).all(axis=1)).sum())
            raise DitqError(f"the digit judge cannot score non-finite images ({bad} of {len(h)} hold NaN or Inf)")
        for w, b in self.layers[:-1]:
            h = np.maximum(h @ w + b, 0.0)
        return h

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._hidden(images)

    __call__ = features

    def logits(self, images: np.ndarray) -> np.ndarray:
        w, b = self.layers[-1]
        return self._hidden(images) @ w + b

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(1)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())


def pool_to(images: np.ndarray, size: int) -> np.ndarray:
    """``images [N, C, H, W]`` average-pooled to ``size x size`` (``H`` and ``W`` multiples of ``size``): how a
    judge of small images scores larger samples (the ``digits-t2i`` judge: 16x16 samples, each 2x2 block
    one pixel of the 8x8 digit judge; exactly the inverse of repeating each pixel 2x2)."""
    x = np.asarray(images, np.float32)
    n, c, h, w = x.shape
    if h % size or w % size:
        raise DitqError(f"cannot pool {h}x{w} images to {size}x{size}: not a whole number of pixels per block")
    return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def default_judge_path() -> Path:
    """The shipped judge: package data of the installed ``ditq`` package (``ditq/assets/judge/``), wherever
    the package lives (a source checkout, an editable install or a wheel)."""
    return Path(str(resources.files("ditq"))) / "assets" / "judge" / "digits_judge.safetensors"


def load_images(path: str | Path) -> np.ndarray:
    """Real images for a custom feature space: a ``.npy`` array [N, C, H, W] with values in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise DitqError(f"real images not found: {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DitqError(f"{path}: not a .npy array ({e})") from None
    if x.ndim != 4 or len(x) < 4 or not np.issubdtype(x.dtype, np.floating) or x.min() < 0 or x.max() > 1:
        raise DitqError(f"{path}: expected float images [N, C, H, W] in [0, 1] (N >= 4), got {x.dtype} {x.shape}")
    return x.astype(np.float32)


def inception_features(weights: str | Path, batch_size: int = 50) -> FeatureFn:
    """The 2048-d pool features of pytorch-fid's Inception network, from a local weights file
    (``pt_inception-2015-12-05-*.pth``). Needs the optional ``pytorch-fid`` package; imports torch."""
    weights = Path(weights)
    if not weights.is_file():
        raise DitqError(f"Inception weights not found: {weights}")
    import torch

    state = read_tensors(weights)  # safetensors, or a weights-only pickle: never executed
    try:
        from pytorch_fid import inception as pf
    except ImportError:
        raise DitqError("Inception features need the pytorch-fid package: pip install pytorch-fid") from None
    # pytorch-fid fetches its weights by URL; give it the local file instead
    pf.load_state_dict_from_url = lambda *a, **k: state
    try:
        net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    except RuntimeError as e:  # load_state_dict(strict=True): missing, unexpected or reshaped tensors
        raise DitqError(f"{weights}: not the weights of pytorch-fid's Inception network ({one_line(e, 200)})") from None

    def extract(images: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.asarray(images[i : i + batch_size], np.float32))
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                out.append(net(x)[0].squeeze(-1).squeeze(-1).numpy())
        return np.concatenate(out)

    return extract
