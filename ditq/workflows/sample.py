"""``ditq sample`` as a library: samples of an exported model, with ONNX Runtime alone (no torch), written
as a labelled PNG grid (one row per class; latents decoded by the model's VAE decoder) or as the raw
samples (``.npy``, ``[N, C, H, W]`` in the model's value range). Everything that can be refused (the
file type, a grid of latents without a decoder, the memory budget, the grid's size) is refused before
any sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ditq.errors import DitqError, shown
from ditq.files import atomic_path
from ditq.options import MAX_COUNT, MAX_ECHO, check_int
from ditq.runtime.generate import ExportedDiT, parse_classes
from ditq.runtime.images import check_grid_size, grid_image, save_png
from ditq.runtime.metrics import DigitJudge


@dataclass(frozen=True)
class SampleResult:
    out: Path
    classes: list[int]
    per_class: int
    judge_accuracy: float | None  # a digits model: the share of samples the digit judge recognises
    seconds: float


def sample_to_file(model_path: str | Path, out: str | Path, *, classes: str | Sequence[int] | None = None, per_class: int = 8,
                   seed: int = 0, steps: int = 50, cfg: float = 1.5, sampler: str = "ddim", batch_size: int = 256,
                   provider: str = "cpu", progress: bool = False) -> SampleResult:  # fmt: skip
    """``per_class`` samples of each of ``classes`` (``"0,3"``, a list, or None: every class) from the
    exported model at ``model_path``, written to ``out`` (``.png`` or ``.npy``)."""
    t0 = time.perf_counter()
    model = ExportedDiT.open(model_path, provider=provider)
    if not (classes is None or isinstance(classes, (str, Sequence, np.ndarray))):
        raise DitqError(f"classes: expected class ids (a list, or text such as '0,3'), got {shown(classes, MAX_ECHO)}")
    text = classes if classes is None or isinstance(classes, str) else ",".join(str(check_int(c, "classes", 0, MAX_COUNT)) for c in classes)
    picked = parse_classes(text, model.num_classes)
    out = Path(out)
    png = out.suffix.lower() == ".png"
    if out.suffix.lower() not in (".png", ".npy"):
        raise DitqError(f"--out {out}: expected a .png grid or a .npy array of samples")
    if png and not model.pipeline.makes_images:
        raise DitqError(f"{model.path} samples latents and carries no VAE decoder: write them with --out FILE.npy")
    model.check_count(len(picked) * per_class)  # before any work: the samples must fit the memory budget
    if png:
        check_grid_size(len(picked), per_class)
    labels = np.repeat(np.asarray(picked, np.int64), per_class)
    x = model.generate(labels, seed=seed, steps=steps, cfg=cfg, method=sampler, batch_size=batch_size, progress=progress)
    lo, hi = model.pipeline.value_range
    if png and model.has_decoder:
        x = model.decode(x, provider=provider)  # latents -> images with the float VAE decoder
    imgs = np.clip((x - lo) / (hi - lo), 0, 1)  # [0, 1] images
    if png:
        rows = [imgs[i * per_class : (i + 1) * per_class] for i in range(len(picked))]
        save_png(grid_image(rows, row_labels=[str(c) for c in picked]), out)
    else:
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, x)
    acc = None
    if model.pipeline.judged_by_digits and model.pipeline.samples_pixels:
        acc = DigitJudge.load().accuracy(imgs, labels)
    return SampleResult(out, picked, per_class, acc, time.perf_counter() - t0)
