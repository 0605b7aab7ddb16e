"""Images from an exported model with ONNX Runtime alone (``ditq sample``; no torch import).

The model file describes itself: ``ditq.model_config`` gives the channels, size and classes, and
``ditq.pipeline`` says whether it samples pixels (clip the predicted x0 to [-1, 1]) or latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ditq.errors import DitqError, shown
from ditq.families import DEFAULT_CLASS, FamilySpec, spec_for
from ditq.fileformat import META_CONFIG, META_FAMILY, META_PIPELINE, MODEL_FILE
from ditq.options import int_list
from ditq.runtime.samplers import sample, seeded_noise
from ditq.schedule import SchedulerSpec
from ditq.runtime.session import OrtDiT, create_session, run_session
from ditq.pipeline import Pipeline
from ditq.untrusted import inside, parse_json_object

# One run's samples (float32: the model-space array, and the decoded images when a VAE decodes them)
# must fit in this many bytes: 1 GiB is 4M digits (8x8) or 65,536 DiT latents (4x32x32).
MAX_SAMPLE_BYTES = 1 << 30


def check_sample_budget(n: int, shape: tuple[int, ...], what: str = "samples") -> None:
    """Refuse ``n`` float32 arrays of ``shape`` that together exceed :data:`MAX_SAMPLE_BYTES`."""
    nbytes = 4 * n * int(np.prod(shape, dtype=object))
    if nbytes > MAX_SAMPLE_BYTES:
        dims = "x".join(str(d) for d in shape)
        raise DitqError(f"{n} {what} of {dims} would take {nbytes / 2**30:.3g} GiB, over the limit of "
                        f"{MAX_SAMPLE_BYTES / 2**30:g} GiB per run: ask for fewer samples")  # fmt: skip

def resolve_model_file(path: str | Path) -> Path:
    """An exported folder or a ``.onnx`` file -> the ``.onnx`` file."""
    p = Path(path)
    if p.is_dir():
        p = inside(p, MODEL_FILE, str(path))
    if not p.is_file():
        raise DitqError(f"no exported model at {path} (expected a folder with {MODEL_FILE}, or an .onnx file)")
    if p.stat().st_size == 0:
        raise DitqError(f"{p}: empty file (0 bytes), not an ONNX model")
    return p


def open_export(path: str | Path, *, provider: str = "cpu", threads: int | None = None) -> tuple[Path, OrtDiT, dict[str, str], FamilySpec]:
    """``(model file, its ONNX Runtime session, its metadata, its family's spec)`` of an exported folder or
    ``.onnx`` file; a file without ditq's metadata, or of a family ditq does not know, is refused."""
    file = resolve_model_file(path)
    fn = OrtDiT(file, provider=provider, threads=threads)
    meta = dict(fn.session.get_modelmeta().custom_metadata_map)
    if META_CONFIG not in meta:
        raise DitqError(f"{file}: not a ditq export (no {META_CONFIG} metadata)")
    return file, fn, meta, spec_for(meta.get(META_FAMILY, DEFAULT_CLASS), f"{file}: {META_FAMILY}")


def export_config(file: Path, meta: Mapping[str, str], spec: FamilySpec) -> dict[str, Any]:
    """The model config an export's metadata records (untrusted), checked by its family's ``spec``."""
    where = f"{file}: {META_CONFIG}"
    return spec.check_config(parse_json_object(meta[META_CONFIG], where), where)


def check_output_channels(file: Path, shape: list, config: dict[str, Any]) -> None:
    """Refuse a graph whose output ``shape`` (as ONNX Runtime reports it) is ``[batch, channels, h, w]``
    with ``channels`` other than what ``config`` states: its ``out_channels`` (``in_channels`` when null),
    which must be ``C`` (the prediction) or ``2C`` (and the learned variance) for ``C = in_channels``. A
    shape known only when the model runs (a named dimension, another or unknown rank) is left to the
    sampler's own check of every output."""
    c = config["in_channels"]
    want = config["out_channels"] or c
    if want not in (c, 2 * c):
        raise DitqError(f"{file}: ditq.model_config: out_channels {want} is neither in_channels {c} nor twice it")
    if len(shape) == 4 and isinstance(shape[1], int) and shape[1] != want:
        raise DitqError(f"{file}: the graph's output has shape {shown(str(shape), quote=False)}; "
                        f"ditq.model_config says [batch, {want}, h, w]")  # fmt: skip


@dataclass
class ExportedDiT:
    """An exported DiT opened in ONNX Runtime, with what its metadata says about it."""

    fn: OrtDiT
    path: Path
    config: dict[str, Any]
    pipeline: Pipeline  # its conditioning fitted to ``config`` (Pipeline.fitted_to)

    @classmethod
    def open(cls, path: str | Path, *, provider: str = "cpu", threads: int | None = None) -> "ExportedDiT":
        file, fn, meta, spec = open_export(path, provider=provider, threads=threads)
        if spec.text_conditioned:
            raise DitqError(f"{file}: a text-to-image model ({spec.class_name}) samples from a prompt: pass --prompt")
        config = export_config(file, meta, spec)
        pipeline = Pipeline.from_metadata(meta, file, fit=(spec.conditioning(config), spec.sample_shape(config)))
        if pipeline.has_decoder:  # refused here, before any sampling, if it links out of the folder
            inside(file.parent, pipeline.vae, f"{file}: {META_PIPELINE}.vae")
        check_output_channels(file, fn.session.get_outputs()[0].shape, config)
        return cls(fn, file, config, pipeline)

    @property
    def schedule(self) -> SchedulerSpec:
        """The sampling spec ``ditq export`` recorded (checked by :meth:`open`); DiT's when none is recorded."""
        return self.pipeline.schedule

    @property
    def has_decoder(self) -> bool:
        return self.pipeline.has_decoder

    def decode(self, latents: np.ndarray, *, provider: str = "cpu", batch_size: int = 16) -> np.ndarray:
        """Latents -> images in [-1, 1] with the float VAE decoder exported next to the model."""
        if not self.has_decoder:
            raise DitqError(f"{self.path} carries no VAE decoder")
        vae = inside(self.path.parent, self.pipeline.vae, f"{self.path}: {META_PIPELINE}.vae")
        session = create_session(vae, provider=provider)
        name, where = session.get_inputs()[0].name, str(vae)
        out = []
        for i in range(0, len(latents), batch_size):
            out.append(run_session(session, {name: latents[i : i + batch_size].astype(np.float32)}, where=where)[0])
            if i == 0:  # the first batch tells the size of a decoded image
                check_sample_budget(len(latents), out[0].shape[1:], "decoded images")
        return np.concatenate(out)

    @property
    def num_classes(self) -> int:
        return self.pipeline.conditioning.num_classes

    @property
    def channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def size(self) -> int:
        return int(self.config["sample_size"])

    def check_count(self, n: int) -> None:
        """Refuse ``n`` samples whose array would exceed :data:`MAX_SAMPLE_BYTES`."""
        check_sample_budget(n, (self.channels, self.size, self.size))

    def check_labels(self, labels: np.ndarray) -> None:
        bad = [int(c) for c in np.unique(labels) if not 0 <= c < self.num_classes]
        if bad:
            raise DitqError(f"class {bad[0]} is out of range: this model has classes 0..{self.num_classes - 1}")

    def generate(
        self,
        labels: np.ndarray,
        *,
        seed: int = 0,
        steps: int = 50,
        cfg: float = 1.5,
        method: str | None = None,
        batch_size: int = 256,
        progress: bool = False,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """Samples of ``labels`` in model space ([-1, 1] for pixel models), from :func:`seeded_noise`;
        ``method`` None: the schedule's default sampler."""
        labels = np.asarray(labels, np.int64)
        self.check_labels(labels)
        self.check_count(len(labels))
        if noise is None:
            noise = seeded_noise(seed, len(labels), self.channels, self.size)
        return generate(
            self.fn, noise, labels, steps=steps, cfg=cfg, method=method, null_class=self.pipeline.conditioning.null_label,
            clip_denoised=self.pipeline.clip_denoised, seed=seed,
            batch_size=batch_size, progress=progress, schedule=self.schedule,
        )  # fmt: skip


def generate(
    fn,
    noise: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    cfg: float,
    method: str | None,
    null_class: int,
    clip_denoised: bool,
    seed: int,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "sample",
    schedule: SchedulerSpec | None = None,
) -> np.ndarray:
    """Sample in batches of ``batch_size`` (each batch's stochastic noise seeded from ``seed`` and its index)."""
    from tqdm.auto import tqdm

    out = []
    schedule = schedule or SchedulerSpec()
    starts = range(0, len(labels), batch_size)
    for b, i in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2, leave=False)):
        out.append(
            sample(
                fn, noise[i : i + batch_size], labels[i : i + batch_size], schedule=schedule, steps=steps,
                method=method, cfg=cfg, null_class=null_class, clip_denoised=clip_denoised,
                seed=seed * 100003 + b, progress=progress and len(starts) < 2,
            )  # fmt: skip
        )
    return np.concatenate(out)


def parse_classes(text: str | None, num_classes: int) -> list[int]:
    """``"0,1,7"`` (:func:`~ditq.options.int_list` over the model's classes ``0..num_classes-1``) or
    ``"all"``/None (every class)."""
    if text is None or text.strip().lower() == "all":
        return list(range(num_classes))
    return int_list(text, "--classes", 0, num_classes - 1)
