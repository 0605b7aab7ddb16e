"""``ditq qat`` as a library: RobuQ quantization-aware training of a digits DiT, written as a diffusers
folder with its recipe (a text-conditioned digits model, ``digits-t2i``: :mod:`ditq.workflows.qat_text`).

The covered linears train through their quantizers (:func:`ditq.calib.qat.prepare_qat`) on scikit-learn's
digits with the seeded, resumable loop of :func:`ditq.calib.train.train_dit`; the EMA weights, back in
plain linears, are written with ``recipe.json``, the model's sampling pipeline, ``qat.json`` (the base
model, recipe, training settings and losses) and a manifest. ``ditq export --recipe OUT/recipe.json``
then quantizes them exactly as at training time.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ditq.adapters import adapter_for
from ditq.calib.digits import load_split
from ditq.calib.qat import prepare_qat, strip_qat
from ditq.calib.train import TrainConfig, train_dit
from ditq.errors import DitqError, shown
from ditq.files import check_out_dir, staged_dir
from ditq.manifest import RECIPE_FILE, write_manifest
from ditq.models import LoadedModel, load_model, source_paths
from ditq.options import MAX_BATCH, MAX_TRAIN_STEPS, SEED_MAX, check_float, check_int
from ditq.recipe import TERNARY, Recipe
from ditq.workflows.export import RecipeOptions, build_recipe
from ditq.workflows.qat_text import run_qat_text


@dataclass(frozen=True)
class QATOptions:
    """RobuQ's recipe (ternary weights; ``abits`` activations, Hadamard-rotated when ``rotate``, allocated
    per layer averaging ``abits`` when ``mixed``) and the training: ``steps`` of ``batch_size`` at
    learning rate ``lr`` (warmup, cosine decay to 10%, EMA 0.999: :meth:`train_config`)."""

    abits: int = 4
    rotate: bool = True
    mixed: bool = False
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.abits, "abits", 1, 8)
        check_int(self.steps, "steps", 1, MAX_TRAIN_STEPS)
        check_int(self.batch_size, "batch_size", 1, MAX_BATCH)
        check_float(self.lr, "lr", 0.0, 1.0, open_lo=True)
        check_int(self.seed, "seed", 0, SEED_MAX)

    def recipe_options(self) -> RecipeOptions:
        return RecipeOptions(wbits=TERNARY, abits=self.abits, rotate=self.rotate, mixed=self.mixed)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=min(50, self.steps // 10),
                           min_lr_ratio=0.1, ema_decay=0.999, seed=self.seed, save_every=max(1, min(250, self.steps)))  # fmt: skip


@dataclass(frozen=True)
class QATResult:
    out_dir: Path
    recipe: Recipe
    losses_per_100_steps: list[float]
    seconds: float
    bits_per_unit: dict[str, int] | None = None  # mixed precision: activation bits of each unit


def qat(model_spec: str, options: QATOptions, out: str | Path, *, checkpoint: str | Path | None = None,
        force: bool = False, progress: bool = False) -> QATResult:  # fmt: skip
    """QAT of ``model_spec`` (a digits model) as ``options`` say, written to the folder ``out``."""
    if not isinstance(options, QATOptions):
        raise DitqError(f"options: expected QATOptions, got {shown(options)}")
    loaded = load_model(model_spec)  # once: for the mixed allocation's sensitivities and for the training
    built = build_recipe(options.recipe_options(), loaded, progress=progress)
    res = run_qat(model_spec, built.recipe, out, options.train_config(), checkpoint=checkpoint, progress=progress,
                  force=force, loaded=loaded)  # fmt: skip
    return QATResult(res.out_dir, res.recipe, res.losses_per_100_steps, res.seconds, built.bits_per_unit)


def run_qat(model_spec: str, recipe: Recipe, out_dir: str | Path, cfg: TrainConfig, *, checkpoint: str | Path | None = None,
            progress: bool = True, force: bool = False, loaded: LoadedModel | None = None) -> QATResult:  # fmt: skip
    """QAT of ``model_spec`` (a digits model: the data are scikit-learn's digits) under ``recipe``; writes a
    diffusers folder with the trained float weights, ``recipe.json``, its sampling pipeline and a manifest
    (``out_dir`` replaces only an empty folder or an earlier ditq output, see :mod:`ditq.files`).
    ``loaded``: ``model_spec`` as :func:`~ditq.models.load_model` gave it, when the caller holds it already."""
    if loaded is None:
        loaded = load_model(model_spec)
    adapter, config = adapter_for(loaded.model), loaded.model.config
    if adapter.conditioning(config) is None:
        out, losses, seconds = run_qat_text(model_spec, recipe, out_dir, cfg, checkpoint=checkpoint, progress=progress, force=force, loaded=loaded)
        return QATResult(out, recipe, losses, seconds)
    pipe = loaded.pipeline.fitted_to(adapter.conditioning(config), adapter.sample_shape(config), f"{model_spec}: pipeline")
    if not pipe.judged_by_digits:
        raise DitqError(f"{model_spec}: ditq qat trains on scikit-learn's digits; this model is not a digits model")
    protect = source_paths(loaded.source) + ([Path(checkpoint)] if checkpoint else [])
    check_out_dir(out_dir, protect=protect, force=force)  # before the training, not after
    split = load_split()
    model = prepare_qat(loaded.model, recipe)
    t0 = time.perf_counter()
    result = train_dit(model, split.x_train, split.y_train, cfg, null_class=pipe.conditioning.null_label,
                       checkpoint=checkpoint, progress=progress)  # fmt: skip
    trained = strip_qat(result.ema)
    seconds = round(time.perf_counter() - t0, 1)
    info = {"base_model": loaded.source, "recipe": recipe.to_dict(), "config": asdict(cfg), "losses_per_100_steps": result.losses,
            "seconds": seconds}  # fmt: skip
    with staged_dir(Path(out_dir), protect=protect, force=force) as stage:
        trained.save_pretrained(stage)
        (stage / RECIPE_FILE).write_text(recipe.to_json() + "\n")
        pipe.write_to(stage)
        (stage / "qat.json").write_text(json.dumps(info, indent=2) + "\n")
        write_manifest(stage, {"kind": "qat"})
    return QATResult(Path(out_dir), recipe, list(result.losses), seconds)
