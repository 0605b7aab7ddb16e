"""How a model samples: one typed record, :class:`Pipeline`, stored in an exported model's metadata
(:data:`~ditq.fileformat.META_PIPELINE`) and in the :data:`PIPELINE_FILE` of a diffusers folder ditq wrote.

The record is read as untrusted input (:meth:`Pipeline.from_dict`): every field is checked and bounded, a
field an earlier ditq did not write takes its default, and one this version does not know is ignored.
``conditioning`` (written since the record was typed) is the model's (given by its family adapter) when absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ditq.errors import DitqError, shown
from ditq.fileformat import META_PIPELINE
from ditq.flow import FlowMatchSpec, Schedule, read_schedule
from ditq.schedule import SchedulerSpec
from ditq.options import is_finite_real
from ditq.text import MAX_TEXT_ENCODERS, TextEncoder
from ditq.untrusted import DIT_CONFIG, MAX_SCALING_FACTOR, MAX_VALUE, Bool, Float, Int, ListOf, Object, OneOf, Pair, Text, check_fields, parse_json_object, read_json


@dataclass(frozen=True)
class ClassConditioning:
    """Class-label conditioning: labels ``0..num_classes-1``; ``null_label`` is the unconditional input
    classifier-free guidance pairs every conditional one with (DiT: ``num_classes``)."""

    num_classes: int
    null_label: int

    def __post_init__(self) -> None:
        for name in ("num_classes", "null_label"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise DitqError(f"conditioning {name} must be a non-negative integer, got {shown(v)}")
        if self.null_label < self.num_classes:
            raise DitqError(f"conditioning null_label {self.null_label} is one of the labels 0..{self.num_classes - 1}")


# What a pipeline is fitted to (Pipeline.fitted_to): the model's class conditioning and the shape of one sample.
Fit = tuple[ClassConditioning | None, tuple[int, ...]]

PIPELINE_FILE = "ditq_pipeline.json"  # a diffusers folder ditq wrote (ditq qat): how to sample it
VAE_DECODER_FILE = "vae_decoder.onnx"  # written next to model.onnx when the source is a pipeline with a VAE
SPACES = ("pixel", "latent")
# The judges ditq ships (ditq.runtime.metrics.DigitJudge) and the images each scores: (channels, size, classes).
JUDGES: dict[str, tuple[int, int, int]] = {"digits": (1, 8, 10), "digits-t2i": (1, 16, 10)}
TEXT_JUDGES = frozenset({"digits-t2i"})  # judges of text-conditioned models (the prompt names the digit)

# The record's fields as JSON: absent ones take these defaults (records of earlier ditq versions hold only
# some of them); fields not named here are ignored (written by a newer ditq).
FIELDS: dict[str, Any] = {
    "space": OneOf(SPACES, "latent"),
    "clip_denoised": Bool(False),
    "value_range": Pair([-1.0, 1.0]),
    "judge": OneOf((None, *JUDGES), None),
    "schedule": Object(None),  # SchedulerSpec.to_dict() or FlowMatchSpec.to_dict(); absent or null: DiT's
    "vae": Text(255, None, nullable=True),  # a file in the model's folder: VAE_DECODER_FILE only
    "scaling_factor": Float(0.0, MAX_SCALING_FACTOR, None, open_lo=True, nullable=True),
    "shift_factor": Float(-MAX_SCALING_FACTOR, MAX_SCALING_FACTOR, None, nullable=True),  # with vae; null: no shift
    "conditioning": Object(None),  # absent or null: the model's, set by a reader that has it
    "text": ListOf(Object(), MAX_TEXT_ENCODERS, None),  # TextEncoder.to_dict() each; absent: none
}
CONDITIONING_FIELDS: dict[str, Any] = {
    "num_classes": Int(1, DIT_CONFIG["num_embeds_ada_norm"].hi),
    "null_label": Int(0, DIT_CONFIG["num_embeds_ada_norm"].hi),
}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and is_finite_real(v)


@dataclass(frozen=True)
class Pipeline:
    """How a model samples: in pixel space (the predicted x0 clipped to ``value_range`` when
    ``clip_denoised``) or in latent space (decoded by the float VAE decoder ``vae``, which divides the
    latents by ``scaling_factor`` and adds ``shift_factor``), with which noise schedule and sampler settings
    (``schedule``: a DDPM-family :class:`SchedulerSpec` or a flow-matching :class:`~ditq.flow.FlowMatchSpec`),
    which class labels (``conditioning``) or which text encoders (``text``), and which judge scores its
    images (``judge``)."""

    space: str = "latent"
    clip_denoised: bool = False
    schedule: Schedule = field(default_factory=SchedulerSpec)
    value_range: tuple[float, float] = (-1.0, 1.0)
    vae: str | None = None
    scaling_factor: float | None = None
    judge: str | None = None
    conditioning: ClassConditioning | None = None
    shift_factor: float | None = None  # the decoder adds it after dividing by scaling_factor (SD3, Flux)
    text: tuple[TextEncoder, ...] = ()  # a text-to-image model's encoders and tokenizers, in the family's order

    def __post_init__(self) -> None:
        def bad(name: str, takes: str) -> DitqError:
            return DitqError(f"{name} must be {takes}, got {shown(getattr(self, name), 60)}")

        if not isinstance(self.space, str) or self.space not in SPACES:
            raise bad("space", "one of " + ", ".join(SPACES))
        if not isinstance(self.clip_denoised, bool):
            raise bad("clip_denoised", "true or false")
        if not isinstance(self.schedule, (SchedulerSpec, FlowMatchSpec)):
            raise bad("schedule", "a SchedulerSpec or a FlowMatchSpec")
        vr = self.value_range
        if not (isinstance(vr, tuple) and len(vr) == 2 and all(_number(v) and abs(v) <= MAX_VALUE for v in vr) and vr[0] < vr[1]):
            raise bad("value_range", "two finite numbers (lo, hi) with lo < hi")
        object.__setattr__(self, "value_range", (float(vr[0]), float(vr[1])))
        if self.vae is not None and self.vae != VAE_DECODER_FILE:
            raise bad("vae", f"null or {VAE_DECODER_FILE!r}")
        if self.scaling_factor is not None:
            if not (_number(self.scaling_factor) and 0 < self.scaling_factor <= MAX_SCALING_FACTOR):
                raise bad("scaling_factor", f"a finite number in (0, {MAX_SCALING_FACTOR:g}]")
            object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
        if (self.vae is None) != (self.scaling_factor is None):
            raise DitqError("vae and scaling_factor come together (the decoder divides the latents by the factor)")
        if self.vae is not None and self.space != "latent":
            raise DitqError(f"vae {self.vae!r} decodes latents, but space is {self.space!r}")
        if self.judge is not None and (not isinstance(self.judge, str) or self.judge not in JUDGES):
            raise bad("judge", "null or one of " + ", ".join(JUDGES))
        if self.judge is not None and self.space != "pixel":
            raise DitqError(f"judge {self.judge!r} scores images, but space is {self.space!r}")
        if self.conditioning is not None and not isinstance(self.conditioning, ClassConditioning):
            raise bad("conditioning", "null or a ClassConditioning")
        if self.shift_factor is not None:
            if not (_number(self.shift_factor) and abs(self.shift_factor) <= MAX_SCALING_FACTOR):
                raise bad("shift_factor", f"a finite number in [-{MAX_SCALING_FACTOR:g}, {MAX_SCALING_FACTOR:g}]")
            if self.vae is None:
                raise DitqError("shift_factor comes with vae (the decoder adds it to the scaled latents)")
            object.__setattr__(self, "shift_factor", float(self.shift_factor))
        if not (isinstance(self.text, tuple) and len(self.text) <= MAX_TEXT_ENCODERS and all(isinstance(t, TextEncoder) for t in self.text)):
            raise bad("text", f"a tuple of at most {MAX_TEXT_ENCODERS} TextEncoders")
        folders = [t.folder for t in self.text]
        if len(set(folders)) != len(folders):
            raise DitqError(f"text names a text encoder twice: {', '.join(folders)}")
        if self.text and self.conditioning is not None:
            raise DitqError("text encoders and class conditioning do not go together (a model takes a prompt or a class)")

    # ----------------------------------------------------------------------------------------- questions
    @property
    def samples_pixels(self) -> bool:
        """The model's samples are images (in ``value_range``), not latents."""
        return self.space == "pixel"

    @property
    def has_decoder(self) -> bool:
        """A VAE decoder (``vae``) turns the model's latents into images."""
        return self.vae is not None

    @property
    def makes_images(self) -> bool:
        """Its samples are images, or latents its VAE decoder turns into images."""
        return self.samples_pixels or self.has_decoder

    @property
    def judged_by_digits(self) -> bool:
        """The digit judge (FID-digits, class accuracy) scores its images: a digits model."""
        return self.judge == "digits"

    def fitted_to(self, conditioning: ClassConditioning | None, sample_shape: tuple[int, ...], where: str = "pipeline") -> "Pipeline":
        """This pipeline for a model of class ``conditioning`` (its family's; None: a text-conditioned model)
        that denoises samples of ``sample_shape`` (no batch axis): the record's conditioning is
        ``conditioning`` when it has none; one that differs is refused, and so is a judge that does not
        score the images the model makes, and text encoders for a class-conditioned model."""
        if conditioning is not None and self.text:
            raise DitqError(f"{where}: text encoders ({', '.join(t.folder for t in self.text)}) do not fit a class-conditioned model")
        if (self.judge in TEXT_JUDGES) != (conditioning is None) and self.judge is not None:
            kind = "text" if conditioning is None else "class"
            raise DitqError(f"{where}: judge {self.judge!r} does not fit a {kind}-conditioned model")
        if self.judge is not None and conditioning is None:
            jc, js, _ = JUDGES[self.judge]
            if tuple(sample_shape) != (jc, js, js):
                made = "x".join(str(d) for d in sample_shape)
                raise DitqError(f"{where}: judge {self.judge!r} scores {jc}x{js}x{js} images; this model makes {made} samples")
        if conditioning is None:
            if self.conditioning is not None:
                raise DitqError(f"{where}: class conditioning does not fit a text-conditioned model")
            return self
        if self.judge is not None:
            jc, js, jn = JUDGES[self.judge]
            if tuple(sample_shape) != (jc, js, js) or conditioning.num_classes != jn:
                made = "x".join(str(d) for d in sample_shape)
                raise DitqError(f"{where}: judge {self.judge!r} scores {jc}x{js}x{js} images of {jn} classes; "
                                f"this model makes {made} samples of {conditioning.num_classes} classes")  # fmt: skip
        if self.conditioning is None:
            return replace(self, conditioning=conditioning)
        if self.conditioning != conditioning:
            c, want = self.conditioning, conditioning
            raise DitqError(f"{where}: conditioning of {c.num_classes} classes with null label {c.null_label} does not fit the "
                            f"model, which has {want.num_classes} classes and null label {want.null_label}")  # fmt: skip
        return self

    # ------------------------------------------------------------------------------- reading and writing
    def to_dict(self) -> dict[str, Any]:
        """The JSON record: ``space``, ``value_range``, ``clip_denoised`` always; ``judge``, ``vae`` and
        ``scaling_factor``, ``shift_factor``, ``conditioning``, ``text`` when set; ``schedule`` unless it is
        DiT's (what an absent one reads as)."""
        d: dict[str, Any] = {"space": self.space, "value_range": list(self.value_range), "clip_denoised": self.clip_denoised}
        if self.judge is not None:
            d["judge"] = self.judge
        if self.schedule != SchedulerSpec():
            d["schedule"] = self.schedule.to_dict()
        if self.vae is not None:
            d["vae"], d["scaling_factor"] = self.vae, self.scaling_factor
        if self.shift_factor is not None:
            d["shift_factor"] = self.shift_factor
        if self.text:
            d["text"] = [t.to_dict() for t in self.text]
        if self.conditioning is not None:
            d["conditioning"] = {"num_classes": self.conditioning.num_classes, "null_label": self.conditioning.null_label}
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, obj: Any, where: str, *, fit: Fit | None = None) -> "Pipeline":
        """The pipeline a record (untrusted: a model's metadata, a folder's file) holds, every field checked
        (:data:`FIELDS`); a failure is one :class:`DitqError` naming ``where`` and the field. ``fit``: the
        model's ``(conditioning, sample shape)``, when the reader has them (see :meth:`fitted_to`)."""
        rec = check_fields(obj, FIELDS, where)
        conditioning = None
        if rec["conditioning"] is not None:
            c = check_fields(rec["conditioning"], CONDITIONING_FIELDS, f"{where}.conditioning", required=tuple(CONDITIONING_FIELDS))
            try:
                conditioning = ClassConditioning(c["num_classes"], c["null_label"])
            except DitqError as e:
                raise DitqError(f"{where}: {e}") from None
        text = tuple(TextEncoder.from_dict(t, f"{where}.text[{i}]") for i, t in enumerate(rec["text"] or ()))
        try:
            pipe = cls(
                space=rec["space"], clip_denoised=rec["clip_denoised"], schedule=read_schedule(rec["schedule"] or {}),
                value_range=tuple(rec["value_range"]), vae=rec["vae"], scaling_factor=rec["scaling_factor"], judge=rec["judge"],
                conditioning=conditioning, shift_factor=rec["shift_factor"], text=text,
            )  # fmt: skip
        except DitqError as e:
            raise DitqError(f"{where}: {e}") from None
        return pipe if fit is None else pipe.fitted_to(*fit, where)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], file: str | Path, *, fit: Fit | None = None) -> "Pipeline":
        """The pipeline an exported model records (its ``metadata_props`` :data:`META_PIPELINE`; a model
        that records none samples as DiT does, in latent space)."""
        where = f"{file}: {META_PIPELINE}"
        return cls.from_dict(parse_json_object(meta.get(META_PIPELINE, "{}"), where), where, fit=fit)

    @classmethod
    def read_from(cls, folder: str | Path, *, fit: Fit | None = None) -> "Pipeline | None":
        """The pipeline a folder's :data:`PIPELINE_FILE` records, or None when it has none."""
        path = Path(folder) / PIPELINE_FILE
        if not path.is_file():
            return None
        return cls.from_dict(read_json(path), str(path), fit=fit)

    def write_to(self, folder: str | Path) -> Path:
        """Write :data:`PIPELINE_FILE` into ``folder`` (one ditq is assembling)."""
        path = Path(folder) / PIPELINE_FILE
        path.write_text(self.to_json(indent=2) + "\n")
        return path
