"""The ``digits`` data: scikit-learn's 8x8 handwritten digits, split once into train and held-out sets.

Pixels (0..16) map to [-1, 1]. The split is stratified and seeded, so every command and test sees the
same 1,297 training and 500 held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

NUM_CLASSES = 10
IMAGE_SIZE = 8
HELD_OUT = 500
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # [N, 1, 8, 8] float32 in [-1, 1]
    y_train: np.ndarray  # [N] int64
    x_test: np.ndarray
    y_test: np.ndarray


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """0..16 grey levels -> [-1, 1]."""
    return (np.asarray(pixels, np.float32) / 8.0 - 1.0).astype(np.float32)


def to_unit_range(x: np.ndarray) -> np.ndarray:
    """Model range [-1, 1] -> [0, 1], clipped."""
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


@lru_cache(maxsize=1)
def load_split() -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = to_model_range(data.images).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=HELD_OUT, stratify=y, random_state=SPLIT_SEED)
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return DigitsSplit(x_tr, y_tr, x_te, y_te)


def train_digits_model(out_dir, cfg=None, *, checkpoint=None, progress: bool = True, force: bool = False) -> dict:
    """Train the ``digits`` DiT from scratch and write it as a diffusers folder (float16 safetensors,
    config.json, training.json, manifest.json) to ``out_dir``, which replaces, atomically, only an empty
    folder or an earlier ditq output (see :mod:`ditq.files`). Returns the training record."""
    import json
    import platform
    from dataclasses import asdict
    from pathlib import Path

    import torch

    from ditq.calib.train import TrainConfig, train_dit
    from ditq.files import check_out_dir, staged_dir
    from ditq.manifest import write_manifest
    from ditq.models import build_dit, digits_config

    cfg = cfg or TrainConfig()
    protect = [Path(checkpoint)] if checkpoint else []
    check_out_dir(out_dir, protect=protect, force=force)  # before the training, not after
    split = load_split()
    model = build_dit(digits_config(), seed=cfg.seed)
    result = train_dit(model, split.x_train, split.y_train, cfg, null_class=NUM_CLASSES, checkpoint=checkpoint, progress=progress)
    with staged_dir(out_dir, protect=protect, force=force) as stage:
        torch.nn.Module.half(result.ema).save_pretrained(stage, safe_serialization=True)
        record = {
            "data": f"scikit-learn load_digits: {len(split.x_train)} training images, {len(split.x_test)} held out "
            f"(stratified, seed {SPLIT_SEED}); pixels 0..16 -> [-1, 1]",
            "train_config": asdict(cfg),
            "parameters": sum(p.numel() for p in result.ema.parameters()),
            "loss_per_100_steps": [round(x, 5) for x in result.losses],
            "seconds": round(result.seconds, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        }
        (stage / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        write_manifest(stage, {"kind": "digits-model"})
    return record


JUDGE_HIDDEN = (256, 64)


def train_judge(out_file, *, seed: int = 0) -> dict:
    """Train the digit judge (scikit-learn MLP on the training split) and write its layers as safetensors
    (``w0, b0, w1, b1, ...``; the last hidden layer is the FID-digits feature space). Returns its record."""
    from safetensors.numpy import save_file
    from sklearn.neural_network import MLPClassifier

    from ditq.files import atomic_path

    split = load_split()
    flat = lambda x: to_unit_range(x).reshape(len(x), -1)  # noqa: E731
    clf = MLPClassifier(hidden_layer_sizes=JUDGE_HIDDEN, alpha=1e-3, max_iter=500, random_state=seed)
    clf.fit(flat(split.x_train), split.y_train)
    tensors = {}
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        tensors[f"w{i}"], tensors[f"b{i}"] = w.astype(np.float32), b.astype(np.float32)
    acc = float(clf.score(flat(split.x_test), split.y_test))
    with atomic_path(out_file) as tmp:
        save_file(tensors, str(tmp), metadata={"held_out_accuracy": f"{acc:.4f}", "hidden": str(JUDGE_HIDDEN)})
    return {"held_out_accuracy": acc, "hidden": list(JUDGE_HIDDEN)}
