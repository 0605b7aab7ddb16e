"""Images from an exported model with ONNX Runtime alone (``ditq sample``; no torch import).

The model file describes itself: ``ditq.model_config`` gives the channels, size and classes, and
``ditq.pipeline`` says whether it samples pixels (clip the predicted x0 to [-1, 1]) or latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditq.errors import DitqError
from ditq.exporter import MODEL_FILE
from ditq.runtime.samplers import NoiseSchedule, sample, seeded_noise
from ditq.runtime.session import OrtDiT

def resolve_model_file(path: str | Path) -> Path:
    """An exported folder or a ``.onnx`` file -> the ``.onnx`` file."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise DitqError(f"no exported model at {path} (expected a folder with {MODEL_FILE}, or an .onnx file)")
    return p


@dataclass
class ExportedDiT:
    """An exported DiT opened in ONNX Runtime, with what its metadata says about it."""

    fn: OrtDiT
    path: Path
    config: dict[str, Any]
    pipeline: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, *, provider: str = "cpu", threads: int | None = None) -> "ExportedDiT":
        file = resolve_model_file(path)
        fn = OrtDiT(file, provider=provider, threads=threads)
        meta = fn.session.get_modelmeta().custom_metadata_map
        if "ditq.model_config" not in meta:
            raise DitqError(f"{file}: not a ditq export (no ditq.model_config metadata)")
        try:
            config = json.loads(meta["ditq.model_config"])
            pipeline = json.loads(meta.get("ditq.pipeline", '{"space": "latent", "clip_denoised": false}'))
        except json.JSONDecodeError as e:
            raise DitqError(f"{file}: corrupt ditq metadata ({e})") from None
        return cls(fn, file, config, pipeline)

    @property
    def schedule(self) -> NoiseSchedule:
        cfg = self.pipeline.get("schedule")
        if not cfg:
            return NoiseSchedule.linear()
        try:
            return NoiseSchedule.from_config(cfg)
        except ValueError as e:
            raise DitqError(f"{self.path}: {e}") from None

    @property
    def has_decoder(self) -> bool:
        return bool(self.pipeline.get("vae"))

    def decode(self, latents: np.ndarray, *, provider: str = "cpu", batch_size: int = 16) -> np.ndarray:
        """Latents -> images in [-1, 1] with the float VAE decoder exported next to the model."""
        from ditq.runtime.session import create_session

        if not self.has_decoder:
            raise DitqError(f"{self.path} carries no VAE decoder")
        session = create_session(self.path.parent / self.pipeline["vae"], provider=provider)
        name = session.get_inputs()[0].name
        out = [session.run(None, {name: latents[i : i + batch_size].astype(np.float32)})[0] for i in range(0, len(latents), batch_size)]
        return np.concatenate(out)

    @property
    def num_classes(self) -> int:
        return int(self.config["num_embeds_ada_norm"])

    @property
    def channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def size(self) -> int:
        return int(self.config["sample_size"])

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
        method: str = "ddim",
        batch_size: int = 256,
        progress: bool = False,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """Samples of ``labels`` in model space ([-1, 1] for pixel models), from :func:`seeded_noise`."""
        labels = np.asarray(labels, np.int64)
        self.check_labels(labels)
        if noise is None:
            noise = seeded_noise(seed, len(labels), self.channels, self.size)
        return generate(
            self.fn, noise, labels, steps=steps, cfg=cfg, method=method, null_class=self.num_classes,
            clip_denoised=bool(self.pipeline.get("clip_denoised", False)), seed=seed,
            batch_size=batch_size, progress=progress, schedule=self.schedule,
        )  # fmt: skip


def generate(
    fn,
    noise: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    cfg: float,
    method: str,
    null_class: int,
    clip_denoised: bool,
    seed: int,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "sample",
    schedule: NoiseSchedule | None = None,
) -> np.ndarray:
    """Sample in batches of ``batch_size`` (each batch's stochastic noise seeded from ``seed`` and its index)."""
    from tqdm.auto import tqdm

    out = []
    schedule = schedule or NoiseSchedule.linear()
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
    """``"0,1,7"`` or ``"all"``/None (every class)."""
    if text is None or text.strip().lower() == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise DitqError(f"--classes: expected comma-separated integers, got {text!r}") from None
    if not classes:
        raise DitqError("--classes is empty")
    return classes
