"""``ditq export`` and ``ditq recipe`` as a library: load -> recipe -> calibrate (GPTQ) -> quantize -> export.

- :class:`RecipeOptions` -> :func:`build_recipe`: the recipe that ``--wbits/--abits/--group-size/
  --symmetric/--no-rotate/--mixed/--recipe/--method`` describe. Q-DiT coverage for 2..8-bit weights
  (``group_size="auto"``: 128, else the largest of 64/32/16 every covered layer's width takes); RobuQ's
  for ternary weights (``wbits=1.58``), with activation bits allocated per layer on the model's measured
  sensitivity when ``mixed``; or a recipe file.
- :class:`CalibrationOptions` -> :func:`calibrate`: GPTQ's calibration inputs, the inputs of every covered
  linear recorded along ``num_samples`` float sampling trajectories of the model (its own schedule), at
  ``timesteps`` of each. With ``cache_dir`` they are cached there as
  ``calib-<model digest>-<settings key>.safetensors``: the digest is SHA-256 of the model's source record,
  the key SHA-256 of the calibration and sampling settings, so another model or setting never reads them.
- :func:`export_model`: the whole export, checking the output folder before any work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ditq.adapters import DEFAULT_CLASS, adapter_for
from ditq.calib.calibration import CalibConfig, load_or_record, record_activations, sampling_key
from ditq.calib.conditioning import PromptConditioning, trajectory_conditioning
from ditq.calib.robuq import mixed_recipe
from ditq.errors import DitqError, shown
from ditq.exporter.export import ExportResult, export
from ditq.exporter.reference import quantize_model
from ditq.files import check_out_dir
from ditq.models import LoadedModel, load_model, source_paths
from ditq.options import MAX_SAMPLES, MAX_STEPS, check_int, check_path
from ditq.recipe import AUTO_GROUP, AUTO_GROUP_CANDIDATES, METHODS, TERNARY, Recipe, Rule, auto_group_size

SAME_GROUP = "same"  # RecipeOptions.block_group_size: the block linears take ``group_size`` too


@dataclass(frozen=True)
class RecipeOptions:
    """What ``ditq export``/``ditq recipe`` flags describe (ranges are checked by the recipe itself)."""

    wbits: int | float = 4  # 2..8, or 1.58 (ditq.recipe.TERNARY): RobuQ
    abits: int | None = 8  # None: float activations
    group_size: int | str | None = AUTO_GROUP  # input channels per scale; None: per channel; "auto"
    symmetric: bool = False
    rotate: bool = True  # RobuQ: Hadamard rotation
    mixed: bool = False  # RobuQ: activation bits per layer, averaging ``abits`` (needs the model)
    recipe_file: str | Path | None = None  # a recipe JSON instead of the fields above
    method: str | None = None  # "rtn" or "gptq" over the recipe's own; None: the recipe's
    # Q-DiT: group size of the weight+activation block linears (the search's genes; ``ditq eval``'s gN)
    # when it differs from ``group_size``; None: per channel / token; SAME_GROUP (or "auto"): ``group_size``
    block_group_size: int | str | None = SAME_GROUP

    def __post_init__(self) -> None:
        if isinstance(self.wbits, bool) or not isinstance(self.wbits, (int, float)):
            raise DitqError(f"wbits: expected 2..8 or 1.58 (ternary), got {shown(self.wbits)}")
        if self.abits is not None and (isinstance(self.abits, bool) or not isinstance(self.abits, int)):
            raise DitqError(f"abits: expected an integer 1..8 or None (float activations), got {shown(self.abits)}")
        g = self.group_size
        if g is not None and g != AUTO_GROUP and (isinstance(g, bool) or not isinstance(g, int)):
            raise DitqError(f"group_size: expected a positive integer, None (per channel) or {AUTO_GROUP!r}, got {shown(g)}")
        for name in ("symmetric", "rotate", "mixed"):
            if not isinstance(getattr(self, name), bool):
                raise DitqError(f"{name}: expected True or False, got {shown(getattr(self, name))}")
        b = self.block_group_size
        if b is not None and b not in (SAME_GROUP, AUTO_GROUP) and (isinstance(b, bool) or not isinstance(b, int)):
            raise DitqError(f"block_group_size: expected a positive integer, None (per channel) or {SAME_GROUP!r}, got {shown(b)}")
        if self.recipe_file is not None and not isinstance(self.recipe_file, (str, Path)):
            raise DitqError(f"recipe_file: expected a path, got {shown(self.recipe_file)}")
        if self.method is not None and self.method not in METHODS:
            raise DitqError(f"method: expected one of {list(METHODS)}, got {shown(self.method)}")


@dataclass(frozen=True)
class BuiltRecipe:
    recipe: Recipe
    bits_per_unit: dict[str, int] | None = None  # mixed precision: activation bits of each unit
    covered: int | None = None  # covered layers of the model it was built on (None: no model)


def build_recipe(options: RecipeOptions, loaded: LoadedModel | None = None, *, progress: bool = False) -> BuiltRecipe:
    """The recipe ``options`` describe. ``loaded``, when given, resolves ``group_size="auto"`` and
    ``mixed`` and is checked to take the recipe; without it ``auto`` means 128 and ``mixed`` is refused."""
    o, bits = options, None
    coverage = adapter_for(DEFAULT_CLASS).coverage if loaded is None else adapter_for(loaded.model).coverage_of(loaded.model)
    if o.recipe_file is not None:
        recipe = Recipe.load(o.recipe_file)
    elif o.wbits == TERNARY:
        if o.abits is None:
            raise DitqError("ternary weights (--wbits 1.58) take RobuQ's coverage and need --abits 1..8")
        if not o.mixed:
            recipe = Recipe.robuq(coverage, o.abits, rotate=o.rotate)
        elif loaded is None:
            raise DitqError("--mixed allocates activation bits on a model's measured sensitivity: give --model")
        else:
            cond = trajectory_conditioning(loaded, "--mixed measures sensitivity on the model's sampling trajectories",
                                           "give --abits without --mixed")  # fmt: skip
            mixed = mixed_recipe(loaded.model, o.abits, rotate=o.rotate, schedule=loaded.schedule,
                                 clip_denoised=loaded.pipeline.clip_denoised, progress=progress, conditioning=cond)  # fmt: skip
            recipe, bits = mixed.recipe, mixed.bits_per_unit
    elif o.mixed or not o.rotate:
        raise DitqError("--mixed and --no-rotate apply to ternary weights (--wbits 1.58)")
    else:

        def qdit(group_size):
            r = Recipe.qdit(coverage, o.wbits, o.abits, group_size, o.symmetric)
            block = group_size if o.block_group_size in (SAME_GROUP, AUTO_GROUP) else o.block_group_size
            if block == group_size:
                return r
            return replace(r, rules=r.rules + tuple(Rule(m, {"group_size": block}) for m in coverage.activation_linears))

        if o.group_size != AUTO_GROUP:
            recipe = qdit(o.group_size)
        elif loaded is None:
            recipe = qdit(AUTO_GROUP_CANDIDATES[0])
        else:
            recipe = qdit(auto_group_size(loaded.model, qdit))
    if o.method:
        recipe = replace(recipe, method=o.method)
    covered = len(recipe.resolve(loaded.model)) if loaded is not None else None
    return BuiltRecipe(recipe, bits, covered)


@dataclass(frozen=True)
class CalibrationOptions:
    """GPTQ's calibration inputs: ``num_samples`` float sampling trajectories, ``timesteps`` recorded in
    each; cached in the folder ``cache_dir`` (None: recorded every time, nothing written)."""

    num_samples: int = 64
    timesteps: int = 10
    cache_dir: str | Path | None = None

    def __post_init__(self) -> None:
        check_int(self.num_samples, "calibration num_samples", 1, MAX_SAMPLES)
        check_int(self.timesteps, "calibration timesteps", 1, MAX_STEPS)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, Path)):
            raise DitqError(f"calibration cache_dir: expected a folder path or None, got {shown(self.cache_dir)}")


def calibration_cache_file(loaded: LoadedModel, options: CalibrationOptions, conditioning: PromptConditioning | None = None) -> Path | None:
    """Where :func:`calibrate` caches the inputs of ``loaded`` under ``options`` (None: not cached); a text
    model's ``conditioning`` (its prompts and guidance) is part of the key."""
    if options.cache_dir is None:
        return None
    cfg = CalibConfig(num_samples=options.num_samples, timesteps_per_sample=options.timesteps)
    settings = json.dumps(asdict(cfg), sort_keys=True) + sampling_key(loaded.schedule, loaded.pipeline.clip_denoised, conditioning)
    key = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return Path(options.cache_dir) / f"calib-{_model_digest(loaded)}-{key}.safetensors"


def _model_digest(loaded: LoadedModel) -> str:
    return hashlib.sha256(json.dumps(loaded.source, sort_keys=True).encode()).hexdigest()[:16]


def calibrate(loaded: LoadedModel, recipe: Recipe, options: CalibrationOptions = CalibrationOptions(), *,
              progress: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """Calibration inputs ``[rows, K]`` of every linear ``recipe`` covers on ``loaded`` (what
    :func:`~ditq.exporter.reference.quantize_model` takes for ``method: gptq``), read from the cache when
    it holds them for this model and these settings. A text model's trajectories take prompts
    (:func:`~ditq.calib.conditioning.trajectory_conditioning`)."""
    cond = trajectory_conditioning(loaded, "GPTQ's calibration (--method gptq) records the model's sampling trajectories",
                                   "use --method rtn")  # fmt: skip
    cfg = CalibConfig(num_samples=options.num_samples, timesteps_per_sample=options.timesteps)
    linears = [n for n, p in recipe.resolve(loaded.model).items() if p.kind == "linear"]
    clip = loaded.pipeline.clip_denoised
    cache = calibration_cache_file(loaded, options, cond)
    if cache is None:
        return record_activations(loaded.model, linears, cfg, schedule=loaded.schedule, clip_denoised=clip, progress=progress,
                                  conditioning=cond)  # fmt: skip
    return load_or_record(cache, loaded.model, linears, cfg, model_digest=_model_digest(loaded), schedule=loaded.schedule,
                          clip_denoised=clip, progress=progress, conditioning=cond)  # fmt: skip


@dataclass(frozen=True)
class ExportOutcome:
    result: ExportResult
    recipe: Recipe
    bits_per_unit: dict[str, int] | None = None  # mixed precision: activation bits of each unit


def export_model(
    model: LoadedModel | str,
    recipe: RecipeOptions | Recipe,
    out: str | Path,
    *,
    target: str = "qdq",
    opset: int | None = None,
    calibration: CalibrationOptions = CalibrationOptions(),
    force: bool = False,
    progress: bool = False,
    consume_model: bool = False,
) -> ExportOutcome:
    """Quantize ``model`` (a :class:`~ditq.models.LoadedModel`, or a spec :func:`~ditq.models.load_model`
    reads) as ``recipe`` says and export it to the folder ``out`` for ``target``. ``out`` is checked first
    (only an empty folder or an earlier ditq output, never the input model: see :mod:`ditq.files`);
    GPTQ recipes are calibrated as ``calibration`` says.

    A model read from a spec, or given with ``consume_model=True`` (``ditq export``), is used up: the
    export quantizes it after tracing it and releases its weights as it goes, so that its peak memory is
    about one float copy of the weights (``quantize_model(..., consume=True)``). Otherwise the caller's
    model is left as it was, and the export also holds the codes of every layer while tracing it."""
    consume = consume_model or not isinstance(model, LoadedModel)
    loaded = model if isinstance(model, LoadedModel) else load_model(check_path(model, "model"))
    check_out_dir(out, protect=source_paths(loaded.source), force=force)  # before any work
    built = build_recipe(recipe, loaded, progress=progress) if isinstance(recipe, RecipeOptions) else BuiltRecipe(recipe)
    cal = calibrate(loaded, built.recipe, calibration, progress=progress) if built.recipe.method == "gptq" else None
    qdit = quantize_model(loaded.model, built.recipe, progress=progress, calibration=cal, target=target, consume=consume)
    del cal  # with consume, the QuantizedDiT holds the calibration until it quantizes
    res = export(qdit, out, source=loaded.source, pipeline=loaded.pipeline, opset=opset, progress=progress, force=force)
    return ExportOutcome(res, built.recipe, built.bits_per_unit)
