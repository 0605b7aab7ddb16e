"""Model families, the torch-free half: what ONNX Runtime sampling and the file readers need to know about
one diffusers transformer class (the torch half, tracing and coverage, is :mod:`ditq.adapters`).

A family is one module of this package: a :class:`FamilySpec` subclass decorated with :func:`register`;
:func:`spec_for` finds the spec of a class name (a config.json's ``_class_name``, an exported model's
``ditq.family``) and refuses any other in one line naming the supported classes. Nothing here imports
torch: ``ditq sample`` reads an exported model's config and builds its inputs through its spec.

A spec gives:

- :meth:`~FamilySpec.check_config`: the model's config (config.json, or the ``ditq.model_config`` an
  exported model records) read as untrusted input: every field checked and bounded, the constructor's
  keyword arguments returned;
- the graph's signature: ``input_names``, ``output_names``;
- :meth:`~FamilySpec.sample_shape`, :meth:`~FamilySpec.output_split`, :meth:`~FamilySpec.conditioning`;
- :meth:`~FamilySpec.feeds`: the graph's inputs for one denoising step (numpy), and
  :meth:`~FamilySpec.prediction`: the step's prediction from the graph's output;
- text families: ``text_encoders`` (what ``ditq export`` writes next to the transformer) and
  :meth:`~FamilySpec.compose_prompt` (the encoders' outputs -> the transformer's text inputs).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ditq.errors import DitqError, shown
from ditq.pipeline import ClassConditioning

PREDICTIONS = ("epsilon", "flow")  # epsilon (DDPM family schedules) or velocity (rectified flow)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a text-to-image pipeline folder, as ``ditq export`` writes it."""

    folder: str  # the pipeline's subfolder: "text_encoder", "text_encoder_2", ...
    tokenizer: str  # the tokenizer's subfolder: "tokenizer", "tokenizer_2", ...
    kind: str  # "clip" (CLIPTextModel), "clip-projection" (CLIPTextModelWithProjection), "t5" (T5EncoderModel)
    max_length: int  # tokens the pipeline pads (and truncates) every prompt to
    outputs: tuple[str, ...]  # the ONNX file's outputs, in order (the file takes ``input_ids`` [B, T] int64)
    attention_mask: bool = False  # the pipeline passes the tokenizer's mask to the encoder (PixArt's T5): an ONNX input
    pad_to_max_length: bool = True  # the pipeline's tokenizer call: padding="max_length"
    truncation: bool = True  # ... truncation=True
    optional: bool = False  # the pipeline runs without it when model_index.json names none (SD3's T5: zeros in its place)


class FamilySpec:
    """One model family (one diffusers transformer class), torch-free; see the module docstring.
    Subclasses set the class attributes and implement what raises ``NotImplementedError``."""

    class_name: str = ""
    # the graph's inputs in order; an input only some models of the family take (Flux's guidance) comes
    # last, and a model's graph takes as many as its adapter's example_inputs give
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ("out",)
    prediction_type: str = "epsilon"  # see PREDICTIONS
    text_encoders: tuple[TextEncoderSpec, ...] = ()  # empty: class-conditioned
    # the family's pipeline guides with a negative prompt (classifier-free guidance) when the guidance scale
    # is over 1; False: its guidance scale is only ever the model's own guidance input (FluxPipeline)
    negative_prompt_guidance: bool = True
    default_guidance: float = 5.0  # the guidance scale the family's diffusers pipeline defaults to
    # flow-matching families: how each of their diffusers pipeline classes spaces the scheduler's steps
    # (ditq.flow's grids: "timesteps", the scheduler's default, or "sigmas", the pipeline's own linspace)
    flow_grids: Mapping[str, str] = {}

    @property
    def text_conditioned(self) -> bool:
        return bool(self.text_encoders)

    def text_encoders_for(self, pipeline_class: Any) -> tuple[TextEncoderSpec, ...]:
        """The text encoders of a pipeline folder whose ``model_index.json`` names ``pipeline_class``:
        :attr:`text_encoders` (a family whose pipelines differ in them overrides this)."""
        return self.text_encoders

    def text_encoder_variants(self) -> tuple[tuple[TextEncoderSpec, ...], ...]:
        """Every list of text encoders a pipeline folder of this family can have (:meth:`text_encoders_for`
        each pipeline class it knows; a family whose pipelines differ in them overrides this)."""
        return (self.text_encoders,)

    def check_text(self, text: Sequence[Any], where: str) -> None:
        """Refuse, in one line naming ``where``, an exported model's text encoder records (``text``:
        :class:`ditq.text.TextEncoder`, read from its metadata) that are not those of a pipeline of this
        family (:meth:`text_encoder_variants`): the same subfolders and kinds in order, each with its
        tokenizer file, ``max_length``, ``attention_mask`` and tokenizer flags. :meth:`compose_prompt` and
        the encoders' graphs take exactly those."""

        def key(e: Any, tokenizer: str) -> tuple:
            return (e.folder, e.kind, tokenizer, e.max_length, e.attention_mask, e.pad_to_max_length, e.truncation)

        got = [key(t, t.tokenizer) for t in text]
        variants = [[key(e, e.tokenizer + ".json") for e in v] for v in self.text_encoder_variants()]
        if got in variants:
            return
        names = ("folder", "kind", "tokenizer", "max_length", "attention_mask", "pad_to_max_length", "truncation")
        for i, rec in enumerate(got):
            for j, name in enumerate(names):
                allowed = sorted({str(v[i][j]) for v in variants if len(v) > i})
                if str(rec[j]) not in allowed:
                    held = shown(rec[j], 60) if isinstance(rec[j], str) else rec[j]
                    raise DitqError(f"{where}: text encoder {i + 1} has {name} {held}; a {self.class_name} pipeline's has "
                                    f"{' or '.join(allowed) or 'no such encoder'}")  # fmt: skip
        want = " or ".join(", ".join(e[0] for e in v) for v in variants)
        raise DitqError(f"{where}: the text encoders {', '.join(r[0] for r in got) or '(none)'} are not those of a "
                        f"{self.class_name} pipeline ({want})")  # fmt: skip

    def check_config(self, obj: Any, where: str) -> dict[str, Any]:
        """The constructor keyword arguments of a config object (untrusted; other keys dropped), every field
        checked and bounded; one :class:`DitqError` naming ``where`` and the field otherwise."""
        raise NotImplementedError

    def sample_shape(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """The shape of one sample the model denoises (no batch axis): ``(C, H, W)`` latents."""
        raise NotImplementedError

    def image_tokens(self, config: Mapping[str, Any]) -> int:
        """The image tokens the transformer attends over at :meth:`sample_shape` (patches of ``patch_size``)."""
        _, h, w = self.sample_shape(config)
        p = int(config.get("patch_size") or 1)
        return (h // p) * (w // p)

    def output_split(self, config: Mapping[str, Any]) -> tuple[int, int]:
        """``(prediction channels, variance channels)`` of the output (variance 0: no learned sigma)."""
        raise NotImplementedError

    def conditioning(self, config: Mapping[str, Any]) -> ClassConditioning | None:
        """The class conditioning (its null label included); None for a text-conditioned family."""
        return None

    def feeds(self, config: Mapping[str, Any], x: np.ndarray, t: np.ndarray, cond: Mapping[str, np.ndarray],
              guidance: float | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """The graph's inputs for one step: samples ``x [B, C, H, W]``, the scheduler's timesteps ``t [B]``
        (what the diffusers pipeline passes the transformer), ``cond`` (per-row conditioning arrays:
        ``class_labels``, or :meth:`compose_prompt`'s), ``guidance`` (guidance-distilled models)."""
        raise NotImplementedError

    def prediction(self, config: Mapping[str, Any], out: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The prediction ``[B, C, H, W]`` of the graph's output (the learned variance dropped)."""
        return out[:, : self.output_split(config)[0]]

    def compose_prompt(self, encoded: Mapping[str, Mapping[str, np.ndarray]], masks: Mapping[str, np.ndarray],
                       config: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """The transformer's text inputs from each encoder's outputs (``encoded[folder][output]``) and the
        tokenizers' attention masks (``masks[folder]``, ``[B, T]`` int64); ``config``: the transformer's (what
        stands in for an optional encoder a pipeline runs without)."""
        raise NotImplementedError

    def prompt_text(self, prompt: str) -> str:
        """The text the family's pipeline tokenizes for ``prompt`` (a family whose pipeline edits prompts
        first overrides this)."""
        return prompt


_REGISTRY: dict[str, FamilySpec] = {}
DEFAULT_CLASS = "DiTTransformer2DModel"  # the family of a model that records none (files before families)


def register(cls: type[FamilySpec]) -> type[FamilySpec]:
    """Class decorator: make ``cls`` (an instance of it) the spec of ``cls.class_name``."""
    if not cls.class_name:
        raise ValueError(f"{cls.__name__} names no class_name")
    if cls.prediction_type not in PREDICTIONS:
        raise ValueError(f"{cls.__name__}: prediction_type {cls.prediction_type!r} is not one of {PREDICTIONS}")
    _REGISTRY[cls.class_name] = cls()
    return cls


def supported() -> tuple[str, ...]:
    """The class names that have a family, sorted."""
    return tuple(sorted(_REGISTRY))


def spec_for(class_name: Any, where: str = "") -> FamilySpec:
    """The spec of ``class_name``; any other value is refused in one line naming the supported classes."""
    if isinstance(class_name, str) and class_name in _REGISTRY:
        return _REGISTRY[class_name]
    at = f"{where}: " if where else ""
    raise DitqError(f"{at}unsupported architecture {shown(class_name)}; ditq supports: {', '.join(supported())}")


# every module of this package is a family: importing it registers its spec
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
