"""``ditq sample`` as a library: samples of an exported model, with ONNX Runtime alone (no torch), written
as a labelled PNG grid (one row per class; latents decoded by the model's VAE decoder) or as the raw
samples (``.npy``, ``[N, C, H, W]`` in the model's value range); a text-to-image model's images of a
prompt (:func:`prompt_to_file`) as one PNG, side by side at their own size, or the latents (``.npy``). Everything that can be refused (the
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
from ditq.flow import FlowMatchSpec
from ditq.runtime.generate import ExportedDiT, parse_classes
from ditq.runtime.images import check_grid_size, grid_image, image_row, save_png
from ditq.runtime.metrics import DigitJudge
from ditq.runtime.text2image import TextToImageModel


@dataclass(frozen=True)
class SampleResult:
    out: Path
    classes: list[int]
    per_class: int
    judge_accuracy: float | None  # a digits model: the share of samples the digit judge recognises
    seconds: float
    sampler: str = "ddim"  # the sampler used: the one asked for, or the model's default


def sample_to_file(model_path: str | Path, out: str | Path, *, classes: str | Sequence[int] | None = None, per_class: int = 8,
                   seed: int = 0, steps: int = 50, cfg: float = 1.5, sampler: str | None = None, batch_size: int = 256,
                   provider: str = "cpu", progress: bool = False) -> SampleResult:  # fmt: skip
    """``per_class`` samples of each of ``classes`` (``"0,3"``, a list, or None: every class) from the
    exported model at ``model_path``, written to ``out`` (``.png`` or ``.npy``); ``sampler`` None: the
    model's default (:attr:`~ditq.schedule.SchedulerSpec.default_sampler`)."""
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
    sampler = sampler or model.schedule.default_sampler
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
    return SampleResult(out, picked, per_class, acc, time.perf_counter() - t0, sampler)


def check_prompt_options(*, prompt: str | None, negative_prompt: str | None, guidance: float | None, classes: str | None,
                         images: int) -> None:  # fmt: skip
    """``ditq sample``'s options that need a prompt (``--negative-prompt``, ``--guidance``, ``--images``)
    without one, or ``--classes`` with one, are refused in one line."""
    if prompt is None:
        given = [f for f, v in (("--negative-prompt", negative_prompt), ("--guidance", guidance), ("--images", images != 1 or None)) if v is not None]
        if given:
            raise DitqError(f"{given[0]} applies to text-to-image models: give the prompt with --prompt")
    elif classes is not None:
        raise DitqError("--classes and --prompt do not go together: a model takes class labels or a prompt")


@dataclass(frozen=True)
class PromptResult:
    out: Path
    images: int
    sampler: str  # "euler" (flow matching), "ddim", "ddpm" or "dpm++2m"
    seconds: float
    guidance: float  # the guidance scale used


def prompt_to_file(model_path: str | Path, out: str | Path, *, prompt: str, negative_prompt: str | None = None, images: int = 1,
                   seed: int = 0, steps: int = 28, guidance: float | None = None, sampler: str | None = None, batch_size: int = 4,
                   provider: str = "cpu", progress: bool = False) -> PromptResult:  # fmt: skip
    """``images`` samples of ``prompt`` from the exported text-to-image model at ``model_path`` (see
    :mod:`ditq.runtime.text2image`), written to ``out``: ``.png`` (decoded, side by side) or ``.npy`` (the
    latents). ``guidance`` None: the family's pipeline default (``spec.default_guidance``); ``sampler`` None:
    the one the model's scheduler config asks for (DDPM-family schedules; flow matching steps with Euler). A
    class-conditioned model is refused in one line."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() not in (".png", ".npy"):
        raise DitqError(f"--out {shown(str(out), MAX_ECHO)}: expected a .png image or a .npy array of latents")
    model = TextToImageModel.open(model_path, provider=provider)
    png = out.suffix.lower() == ".png"
    guidance = model.spec.default_guidance if guidance is None else guidance
    if png and not model.pipeline.makes_images:
        raise DitqError(f"{model.path} samples latents and carries no VAE decoder: write them with --out FILE.npy")
    x = model.generate(prompt, negative_prompt=negative_prompt, n=images, seed=seed, steps=steps, guidance=guidance,
                       sampler=sampler, batch_size=batch_size, progress=progress)  # fmt: skip
    if png:
        lo, hi = model.pipeline.value_range
        imgs = model.decode(x) if model.pipeline.has_decoder else x
        save_png(image_row(np.clip((imgs - lo) / (hi - lo), 0, 1)), out)
    else:
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, x)
    used = "euler" if isinstance(model.pipeline.schedule, FlowMatchSpec) else sampler or model.pipeline.schedule.default_sampler
    return PromptResult(out, images, used, time.perf_counter() - t0, guidance)
