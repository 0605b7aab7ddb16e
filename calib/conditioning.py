"""What the calibration trajectories are conditioned on: class labels, or prompts encoded once.

A class-conditioned model samples its trajectories from labels cycling through its classes, guided by the
null class (:func:`ditq.calib.calibration.sample_trajectories` as it always has: that path takes no
:class:`PromptConditioning`). A text-conditioned model samples them from prompts:

- **which**: a model the ``digits-t2i`` judge scores (the shipped ``digits-t2i`` and models trained from it)
  the paraphrases it was trained on (:func:`ditq.calib.digits_prompts.train_prompts`), interleaved so that
  sample ``i`` shows digit ``i mod 10``; any other text model the generic captions :data:`GENERIC_PROMPTS`;
- **encoded**: once, by the float torch text encoders of the model's pipeline folder (transformers' classes,
  :mod:`ditq.encoders`), tokenized as the family's pipeline tokenizes them and combined by the family spec's
  :meth:`~ditq.families.FamilySpec.compose_prompt`: the rows the exported model's own sampling feeds;
- **guided**: classifier-free guidance with the empty prompt, as the family's pipelines guide (the family's
  ``default_guidance``; a guidance-distilled model takes the scale as its input instead).

The prompts and the guidance scale are part of the calibration cache's key (:meth:`PromptConditioning.key`).
A text model loaded without its pipeline folder's encoders (a preset, a bare transformer folder) has no
prompts source and is refused in one line (:func:`trajectory_conditioning`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ditq.adapters import adapter_for
from ditq.calib.digits_prompts import train_prompts
from ditq.encoders import TextEncoderGraph, load_text_encoder, load_tokenizer, pipeline_tokenize
from ditq.errors import DitqError
from ditq.models import source_paths

DIGITS_T2I_JUDGE = "digits-t2i"  # the pipeline judge of the text-conditioned digits models
NEGATIVE_PROMPT = ""  # the unconditional prompt classifier-free guidance pairs every prompt with
# Captions for a text model without prompts of its own: everyday scenes, objects, styles and colours.
GENERIC_PROMPTS = (
    "a photo of a cat",
    "a red car on a city street",
    "a painting of a mountain lake at sunrise",
    "a small bird on a tree branch",
    "a bowl of fruit on a wooden table",
    "an old house in the snow",
    "a boat on the sea at night",
    "a dog running on the beach",
)


@dataclass(frozen=True)
class PromptConditioning:
    """Text conditioning of calibration trajectories: ``prompts`` (sample ``i`` takes ``prompts[i mod
    len]``), their encoded rows ``cond`` (the transformer's text inputs, one row per prompt), the empty
    prompt's ``uncond`` (one row) and the guidance scale."""

    prompts: tuple[str, ...]
    cond: Mapping[str, np.ndarray]
    uncond: Mapping[str, np.ndarray]
    guidance: float

    def rows(self, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(cond, uncond)`` for ``n`` samples: sample ``i``'s prompt rows and ``n`` empty-prompt rows."""
        idx = np.arange(n) % len(self.prompts)
        return {k: v[idx] for k, v in self.cond.items()}, {k: np.repeat(v[:1], n, axis=0) for k, v in self.uncond.items()}

    def key(self) -> str:
        """What the calibration cache records of this conditioning (JSON, sorted keys)."""
        return json.dumps({"prompts": list(self.prompts), "negative_prompt": NEGATIVE_PROMPT, "guidance": self.guidance}, sort_keys=True)


def calibration_prompts(pipeline) -> tuple[str, ...]:
    """The prompts a text model's calibration trajectories take (module docstring): the training paraphrases
    of a ``digits-t2i`` model, digit-interleaved, else :data:`GENERIC_PROMPTS`."""
    if pipeline.judge != DIGITS_T2I_JUDGE:
        return GENERIC_PROMPTS
    per_digit = [train_prompts(d) for d in range(10)]
    return tuple(per_digit[d][j % len(per_digit[d])] for j in range(max(map(len, per_digit))) for d in range(10))


def encode_prompts(root: str | Path, text, spec, prompts: list[str], config: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The transformer's text inputs for ``prompts`` (one row each): each encoder of ``text`` (the pipeline
    record's :class:`~ditq.text.TextEncoder` list) of the pipeline folder ``root``, float32 torch, on the ids
    its transformers tokenizer gives as the pipeline calls it, combined by ``spec.compose_prompt`` (``config``: the
    transformer's)."""
    texts = [spec.prompt_text(p) for p in prompts]
    encoded: dict[str, dict[str, np.ndarray]] = {}
    masks: dict[str, np.ndarray] = {}
    for enc in text:
        ids, mask = pipeline_tokenize(load_tokenizer(Path(root) / enc.tokenizer.removesuffix(".json")), enc, texts)
        graph = TextEncoderGraph(load_text_encoder(root, enc), enc.kind).eval()
        with torch.no_grad():
            out = graph(*(torch.from_numpy(a) for a in ((ids, mask) if enc.attention_mask else (ids,))))
        out = (out,) if enc.kind == "t5" else out
        encoded[enc.folder] = {name: o.float().numpy() for name, o in zip(enc.outputs, out)}
        masks[enc.folder] = mask
    return {k: np.asarray(v, np.float32) for k, v in spec.compose_prompt(encoded, masks, config).items()}


def prompt_conditioning(root: str | Path, pipeline, spec, prompts: tuple[str, ...] | None = None,
                        guidance: float | None = None, config: Mapping[str, Any] | None = None) -> PromptConditioning:  # fmt: skip
    """The :class:`PromptConditioning` of a text model of the family ``spec`` whose pipeline folder is
    ``root`` and pipeline record ``pipeline``: ``prompts`` (None: :func:`calibration_prompts`) and the empty
    prompt encoded in one batch, at ``guidance`` (None: the family's default); ``config``: the transformer's."""
    prompts = tuple(prompts if prompts is not None else calibration_prompts(pipeline))
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DitqError("calibration prompts: expected a non-empty list of strings")
    rows = encode_prompts(root, pipeline.text, spec, [*prompts, NEGATIVE_PROMPT], config)
    n = len(prompts)
    g = float(spec.default_guidance if guidance is None else guidance)
    return PromptConditioning(prompts, {k: v[:n] for k, v in rows.items()}, {k: v[n:] for k, v in rows.items()}, g)


def trajectory_conditioning(loaded, what: str, instead: str, *, prompts: tuple[str, ...] | None = None) -> PromptConditioning | None:
    """How ``loaded`` (a :class:`~ditq.models.LoadedModel`) samples its calibration trajectories: None for
    a class-conditioned model (labels, as always), else its :func:`prompt_conditioning`. A text model
    without its pipeline folder's text encoders is refused in one line: ``what`` it is for, ``instead``
    what to do."""
    adapter = adapter_for(loaded.model)
    if loaded.pipeline.conditioning is not None or adapter.conditioning(dict(loaded.model.config)) is not None:
        return None
    roots = [p for p in source_paths(loaded.source) if p.is_dir()]
    if not loaded.pipeline.text or not roots:
        raise DitqError(f"{what}; {type(loaded.model).__name__} is text-conditioned and was loaded without the text encoders "
                        f"of a pipeline folder (model_index.json) to encode its prompts: give the pipeline folder, or {instead}")  # fmt: skip
    return prompt_conditioning(roots[0], loaded.pipeline, adapter.spec, prompts, config=dict(loaded.model.config))


def conditioning_key(conditioning: Any) -> str | None:
    """The cache key part of a conditioning (None: class labels, which the sampling key covers)."""
    return None if conditioning is None else conditioning.key()
