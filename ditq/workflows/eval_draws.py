"""What ``ditq eval`` samples of each configuration's export, and how its judge sees the samples: labels of a
class-conditioned model (:class:`ClassDraws`), prompts of a text-conditioned one (:class:`TextDraws`). Each
gives the float PyTorch model's first denoising step on a probe batch (the report's SQNR column), opens an
export, samples it on a seed set and maps the samples to the judge's images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ditq.adapters import adapter_for
from ditq.calib.conditioning import GENERIC_PROMPTS, trajectory_conditioning
from ditq.calib.digits_prompts import NUM_DIGITS, held_out_prompts
from ditq.errors import DitqError
from ditq.flow import FlowMatchSpec
from ditq.models import LoadedModel
from ditq.pipeline import JUDGES, TEXT_JUDGES
from ditq.runtime.generate import ExportedDiT
from ditq.runtime.metrics import pool_to
from ditq.runtime.samplers import seeded_noise
from ditq.runtime.text2image import TextToImageModel

DIGIT_SIZE = JUDGES["digits"][1]  # the digit judge scores 8x8 images


class ClassDraws:
    """What ``ditq eval`` samples of a class-conditioned model: labels cycling through its classes, drawn by
    :meth:`~ditq.runtime.generate.ExportedDiT.generate` with the null class as guidance."""

    def __init__(self, loaded: LoadedModel, model_spec: str, *, num_samples: int, steps: int, cfg: float, sampler: str | None,
                 seed: int, provider: str):  # fmt: skip
        pipe, schedule = loaded.pipeline, loaded.schedule
        mcfg = dict(loaded.model.config)
        c, size, ncls = mcfg["in_channels"], mcfg["sample_size"], pipe.conditioning.num_classes
        self.sampler = sampler or schedule.default_sampler
        self.judged = pipe.judged_by_digits
        self.not_digits = (f"is not a digits model (it makes {c}x{size}x{size} images of {ncls} classes, and its pipeline "
                           "names no digit judge)")  # fmt: skip
        self.labels = np.arange(num_samples, dtype=np.int64) % ncls
        self.value_range, self.steps, self.cfg, self.provider = pipe.value_range, steps, cfg, provider
        # the float reference of the first denoising step (the sampler's first timestep), on seed set ``seed``
        self.first_timestep = int(schedule.plan(steps, self.sampler)[0][0])
        probe = min(num_samples, 64)
        self._probe = (seeded_noise(seed, probe, c, size), np.full(probe, self.first_timestep, np.int64), self.labels[:probe])
        self.float_probe = adapter_for(loaded.model).torch_callable(loaded.model)(*self._probe)
        self.settings: dict[str, Any] = {}

    def open(self, out_dir: Path) -> ExportedDiT:
        return ExportedDiT.open(out_dir, provider=self.provider)

    def probe(self, model: ExportedDiT) -> np.ndarray:
        return model.fn(*self._probe)

    def sample(self, model: ExportedDiT, seed: int) -> np.ndarray:
        return model.generate(self.labels, seed=seed, steps=self.steps, cfg=self.cfg, method=self.sampler, batch_size=len(self.labels))

    def images(self, x: np.ndarray, judged: bool = True) -> np.ndarray:
        """Samples as images in [0, 1] (what the judge scores)."""
        lo, hi = self.value_range
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0)

    def held_out_conditioning(self) -> None:
        return None  # class labels: record_activations samples its own


class TextDraws:
    """What ``ditq eval`` samples of a text-conditioned model, prompt by prompt in ONNX Runtime
    (:meth:`~ditq.runtime.text2image.TextToImageModel.generate_prompts`: the export's own tokenizer and float
    text encoder, guidance with the empty prompt). A model the ``digits-t2i`` judge scores takes the held-out
    paraphrases it never saw in training (sample ``i``: digit ``i mod 10``, the ``i // 10``-th paraphrase
    of it, cycling), and its 16x16 samples are judged 2x2-pooled to the digit judge's 8x8; another text model
    takes the generic captions of its calibration (:data:`~ditq.calib.conditioning.GENERIC_PROMPTS`)."""

    def __init__(self, loaded: LoadedModel, model_spec: str, *, num_samples: int, steps: int, cfg: float, sampler: str | None,
                 seed: int, provider: str):  # fmt: skip
        pipe, schedule = loaded.pipeline, loaded.schedule
        self.loaded, self.adapter = loaded, adapter_for(loaded.model)
        self.config = dict(loaded.model.config)
        self.judged = pipe.judge in TEXT_JUDGES
        self.not_digits = "is a text-to-image model whose pipeline names no digits-t2i judge"
        if self.judged:
            self.labels = np.arange(num_samples, dtype=np.int64) % NUM_DIGITS
            self.prompts = [held_out_prompts(int(d))[(i // NUM_DIGITS) % len(held_out_prompts(int(d)))] for i, d in enumerate(self.labels)]
        else:
            self.labels = np.arange(num_samples, dtype=np.int64) % len(GENERIC_PROMPTS)
            self.prompts = [GENERIC_PROMPTS[int(i)] for i in self.labels]
        self.flow = isinstance(schedule, FlowMatchSpec)
        if self.flow and sampler not in (None, "euler"):
            raise DitqError(f"{model_spec}: samples with a flow-matching schedule (Euler steps); --sampler {sampler} is for DDPM-family schedules")
        self.sampler = "euler" if self.flow else sampler or schedule.default_sampler
        self.value_range, self.steps, self.cfg, self.provider = pipe.value_range, steps, cfg, provider
        spec = self.adapter.spec
        if self.flow:
            self.first_timestep = float(schedule.plan(steps, spec.image_tokens(self.config))[1][0])
        else:
            self.first_timestep = int(schedule.plan(steps, self.sampler)[0][0])
        # the float reference of the first step on the first prompts, their rows encoded by the float torch text encoders
        probe = min(num_samples, 64)
        rows, _ = self.conditioning(self.prompts[:probe]).rows(probe)
        x = np.random.default_rng(seed).standard_normal((probe, *spec.sample_shape(self.config))).astype(np.float32)
        t = np.full(probe, self.first_timestep, np.float32 if self.flow else np.int64)
        guidance = cfg if "guidance" in self.adapter.input_names else None  # a guidance-distilled model's input
        self._feeds = spec.feeds(self.config, x, t, rows, guidance)
        self.float_probe = self.adapter.torch_callable(loaded.model)(*(self._feeds[n] for n in self.adapter.input_names))
        self.settings = {"prompts": "held-out paraphrases" if self.judged else "generic captions", "distinct_prompts": len(set(self.prompts))}

    def conditioning(self, prompts: list[str]):
        what = "ditq eval encodes its prompts with the model's float text encoders"
        return trajectory_conditioning(self.loaded, what, "export the pipeline folder and sample it with ditq sample --prompt",
                                       prompts=tuple(prompts))  # fmt: skip

    def open(self, out_dir: Path) -> TextToImageModel:
        return TextToImageModel.open(out_dir, provider=self.provider)

    def probe(self, model: TextToImageModel) -> np.ndarray:
        return model.fn.run_feeds(self._feeds)

    def sample(self, model: TextToImageModel, seed: int) -> np.ndarray:
        return model.generate_prompts(self.prompts, seed=seed, steps=self.steps, guidance=self.cfg,
                                      sampler=None if self.flow else self.sampler, batch_size=min(len(self.prompts), 250))  # fmt: skip

    def images(self, x: np.ndarray, judged: bool = True) -> np.ndarray:
        """Samples as images in [0, 1]; ``judged``: as the judge scores them (pooled to its resolution)."""
        lo, hi = self.value_range
        imgs = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
        return pool_to(imgs, DIGIT_SIZE) if judged and self.judged else imgs

    def held_out_conditioning(self):
        return self.conditioning(list(dict.fromkeys(self.prompts)))
