"""ditq: Diffusion Transformers to deployable low-bit ONNX models, run with ONNX Runtime.

Python API (the CLI is a thin layer over the same workflows; every function takes typed arguments and
raises :class:`DitqError`, one line, on bad input)::

    import ditq
    loaded = ditq.load_model("digits")                        # built-in, preset, diffusers folder or DiT checkpoint
    recipe = ditq.build_recipe(ditq.RecipeOptions(wbits=4, abits=8, group_size=64, method="gptq"), loaded).recipe
    inputs = ditq.calibrate(loaded, recipe, ditq.CalibrationOptions(num_samples=16))   # GPTQ's calibration
    qdit = ditq.quantize(loaded.model, recipe, calibration=inputs)   # integer weights + PyTorch reference
    ditq.export(qdit, "out/digits-w4a8", source=loaded.source)       # model.onnx + recipe.json + manifest.json
    assert ditq.validate("out/digits-w4a8").passed                   # ONNX Runtime vs the reference
    ditq.sample("out/digits-w4a8", "grid.png", classes=[0, 1, 2])    # ONNX Runtime alone

    # the same in one call, as `ditq export` does it
    ditq.export_model("digits", ditq.RecipeOptions(wbits=4, abits=8, method="gptq"), "out/digits-w4a8", force=True)
    # `ditq eval`, `ditq bench`, `ditq search`, `ditq qat`
    report = ditq.evaluate("digits", "fp,w4a8", num_samples=100, steps=20)
    bench = ditq.bench("digits", "float,w4a8", runs=3)
    found = ditq.search("digits", ditq.SearchOptions(abits=4, search=ditq.SearchConfig(population=4, generations=1)),
                        "search.jsonl")                              # found.recipe, found.ranking
    ditq.qat("digits", ditq.QATOptions(abits=4, steps=100), "out/digits-qat")

Importing ``ditq`` imports no torch: each function, and each options class (``ditq.RecipeOptions``, ...),
imports its workflow (:mod:`ditq.workflows`) when first used.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ditq.errors import DitqError
from ditq.options import check_path
from ditq.recipe import LayerQuant, Recipe, Rule

if TYPE_CHECKING:
    from ditq.calib.train import TrainConfig
    from ditq.workflows.export import CalibrationOptions, RecipeOptions
    from ditq.workflows.fitness import FitnessConfig
    from ditq.workflows.qat import QATOptions
    from ditq.workflows.search import SearchOptions

# typed options, imported from their workflow on first use (``ditq.RecipeOptions``)
_LAZY = {
    "RecipeOptions": "ditq.workflows.export", "CalibrationOptions": "ditq.workflows.export",
    "SearchOptions": "ditq.workflows.search", "SearchConfig": "ditq.calib.search", "FitnessConfig": "ditq.workflows.fitness",
    "QATOptions": "ditq.workflows.qat", "TrainConfig": "ditq.calib.train", "EvalConfig": "ditq.workflows.evaluate",
}  # fmt: skip

__all__ = [
    "DitqError", "LayerQuant", "Recipe", "Rule", *_LAZY, "load_model", "build_recipe", "calibrate", "quantize", "export",
    "export_model", "validate", "sample", "evaluate", "bench", "check_goals", "search", "compare_fitness", "qat",
    "train_digits",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ditq' has no attribute {name!r}")


def load_model(spec: str, *, image_size: int | None = None, seed: int = 0, num_heads: int | None = None):
    """A :class:`~ditq.models.LoadedModel`: see :func:`ditq.models.load_model`."""
    from ditq.models import load_model as _load

    return _load(check_path(spec, "spec"), image_size=image_size, seed=seed, num_heads=num_heads)


def build_recipe(options: RecipeOptions, model=None, *, progress: bool = False):
    """The recipe ``options`` describe (``.recipe``; ``.bits_per_unit`` for mixed precision), on ``model``
    (a ``LoadedModel`` or a spec; None: no model, ``group_size="auto"`` means 128): see
    :func:`ditq.workflows.export.build_recipe`."""
    from ditq.workflows.export import build_recipe as _build

    return _build(options, _loaded(model) if model is not None else None, progress=progress)


def calibrate(model, recipe: Recipe, options: CalibrationOptions | None = None, *, progress: bool = False):
    """GPTQ's calibration inputs (layer name -> ``[rows, K]`` tensor) of every linear ``recipe`` covers on
    ``model`` (a ``LoadedModel`` or a spec), recorded along its own float sampling trajectories, for
    :func:`quantize`'s ``calibration``: see :func:`ditq.workflows.export.calibrate`."""
    from ditq.workflows.export import CalibrationOptions, calibrate as _calibrate

    return _calibrate(_loaded(model), recipe, options or CalibrationOptions(), progress=progress)


def quantize(model, recipe: Recipe, *, calibration: dict | None = None, target: str = "qdq", progress: bool = False):
    """Quantize every weight ``recipe`` covers on ``model`` (an ``nn.Module``) for ``target``: round to
    nearest, or GPTQ (``recipe.method == "gptq"``) on ``calibration`` (from :func:`calibrate`). A
    :class:`~ditq.exporter.reference.QuantizedDiT`: see :func:`ditq.exporter.reference.quantize_model`."""
    from ditq.exporter.reference import quantize_model

    return quantize_model(model, recipe, progress=progress, calibration=calibration, target=target)


def export(qdit, out_dir: str | Path, *, source: dict | None = None, pipeline=None, opset: int | None = None,
           external_data_bytes: int = 256 << 20, force: bool = False, progress: bool = False):  # fmt: skip
    """Write ``qdit`` (from :func:`quantize`) as a model folder: see :func:`ditq.exporter.export.export`
    (``external_data_bytes``: weights above this size go to ``model.onnx.data``)."""
    from ditq.exporter.export import export as _export

    return _export(qdit, check_path(out_dir, "out_dir"), source=source or {"kind": "api"}, pipeline=pipeline, opset=opset,
                   external_data_bytes=external_data_bytes, progress=progress, force=force)  # fmt: skip


def export_model(model, recipe: RecipeOptions | Recipe, out: str | Path, *, target: str = "qdq", opset: int | None = None,
                 calibration: CalibrationOptions | None = None, force: bool = False, progress: bool = False):  # fmt: skip
    """``ditq export``: load (``model``: a ``LoadedModel`` or a spec) -> recipe -> calibrate (GPTQ) ->
    quantize -> export to ``out``: see :func:`ditq.workflows.export.export_model` (a model read from a spec
    is used up by the export; a ``LoadedModel`` is left as it was)."""
    from ditq.workflows.export import CalibrationOptions, export_model as _export_model

    loaded = _loaded(model)
    return _export_model(loaded, recipe, check_path(out, "out"), target=target, opset=opset, calibration=calibration or CalibrationOptions(),
                         force=force, progress=progress, consume_model=loaded is not model)  # fmt: skip


def validate(model_path: str | Path, *, model_spec: str | None = None, recipe_path: str | Path | None = None,
             image_size: int | None = None, provider: str = "cpu", progress: bool = False):  # fmt: skip
    """``ditq validate``: see :func:`ditq.workflows.validate.validate`."""
    from ditq.workflows.validate import validate as _validate

    return _validate(check_path(model_path, "model_path"), model_spec=check_path(model_spec, "model_spec", optional=True),
                     recipe_path=check_path(recipe_path, "recipe_path", optional=True), image_size=image_size, provider=provider,
                     progress=progress)  # fmt: skip


def sample(model_path: str | Path, out: str | Path, *, classes: str | Sequence[int] | None = None, per_class: int = 8,
           seed: int = 0, steps: int = 50, cfg: float = 1.5, sampler: str | None = None, batch_size: int = 256,
           provider: str = "cpu", progress: bool = False):  # fmt: skip
    """``ditq sample`` (ONNX Runtime alone): see :func:`ditq.workflows.sample.sample_to_file`."""
    from ditq.workflows.sample import sample_to_file

    return sample_to_file(check_path(model_path, "model_path"), check_path(out, "out"), classes=classes, per_class=per_class, seed=seed, steps=steps, cfg=cfg, sampler=sampler,
                          batch_size=batch_size, provider=provider, progress=progress)  # fmt: skip


def evaluate(model: str = "digits", configs: str | Sequence = "fp,w8a8,w6a8,w4a8,w4a16", *, num_samples: int = 500,
             steps: int = 50, cfg: float = 1.5, sampler: str | None = None, seeds: Sequence[int] = (0,), group_size: int | None = 64,
             symmetric: bool = False, method: str | None = None, calibration: CalibrationOptions | None = None,
             provider: str = "cpu", exports_dir: str | Path | None = None, grid_path: str | Path | None = None,
             features=None, real_images=None, layer_error: bool = False, progress: bool = False):  # fmt: skip
    """``ditq eval``: ``configs`` (``"fp,w4a8,w4a4g32"`` or a list of ``ditq.EvalConfig``) of ``model``
    exported, sampled with ONNX Runtime and judged; GPTQ configurations are calibrated as ``calibration``
    says. ``features`` (a callable, or Inception weights) and ``real_images`` (an array, or a folder of
    images) measure FID in another feature space, e.g. for models without the digit judge. An
    :class:`~ditq.workflows.evaluate.EvalReport`: see :func:`ditq.workflows.evaluate.evaluate`."""
    from ditq.workflows.evaluate import evaluate as _evaluate, parse_configs
    from ditq.workflows.export import CalibrationOptions

    model, exports_dir = check_path(model, "model"), check_path(exports_dir, "exports_dir", optional=True)
    grid_path = check_path(grid_path, "grid_path", optional=True)
    confs = parse_configs(configs, group_size) if isinstance(configs, str) else list(configs)
    if isinstance(features, (str, os.PathLike)):
        features = check_path(features, "features")
    if isinstance(real_images, (str, os.PathLike)):
        real_images = check_path(real_images, "real_images")
    return _evaluate(model, confs, num_samples=num_samples, steps=steps, cfg=cfg, sampler=sampler, seeds=seeds,
                     group_size=group_size, symmetric=symmetric, method=method, provider=provider, exports_dir=exports_dir,
                     grid_path=grid_path, features=features, real_images=real_images,
                     calibration=calibration or CalibrationOptions(), layer_error=layer_error, progress=progress)  # fmt: skip


def bench(model: str = "digits", variants: str | Sequence = "float,ort-int8,ort-int4,w8a8,w4a8,w4a8@qdq", *,
          group_size: int | str | None = "auto", batch: int = 1, runs: int = 10, threads: int | None = None,
          provider: str = "cpu", work_dir: str | Path | None = None, quality: int = 0, quality_steps: int = 50,
          profile: bool = False, image_size: int | None = None, progress: bool = False):  # fmt: skip
    """``ditq bench``: latency, size, peak memory and error of ``variants`` (``"float,ort-int8,w4a8"`` or a
    list of :class:`~ditq.workflows.bench.Variant`) against float ONNX Runtime. A
    :class:`~ditq.workflows.bench.BenchReport`: see :func:`ditq.workflows.bench.bench`."""
    from ditq.workflows.bench import bench as _bench, parse_variants

    model, work_dir = check_path(model, "model"), check_path(work_dir, "work_dir", optional=True)
    chosen = parse_variants(variants, group_size) if isinstance(variants, str) else list(variants)
    return _bench(model, chosen, batch=batch, runs=runs, threads=threads, provider=provider, work_dir=work_dir, quality=quality,
                  quality_steps=quality_steps, profile=profile, image_size=image_size, progress=progress)  # fmt: skip


def check_goals(report) -> list[str]:
    """``ditq bench --check``: the deployment goals of the ``ort`` target that ``report`` (from
    :func:`bench`) misses, one line each (empty: all met): see :func:`ditq.workflows.bench.check_goals`."""
    from ditq.workflows.bench import check_goals as _check

    return _check(report)


def search(model: str, options: SearchOptions, journal: str | Path, *, progress: bool = False):
    """``ditq search``: Q-DiT's group-size search on ``model``, journaled (and resumed from) ``journal``; a
    :class:`~ditq.workflows.search.SearchOutcome` (``.recipe``, ``.ranking``): see :mod:`ditq.workflows.search`."""
    from ditq.workflows.search import search as _search

    return _search(check_path(model, "model"), options, check_path(journal, "journal"), progress=progress)


def compare_fitness(model: str, configs: str | Sequence, *, seeds: Sequence[int] = (1, 2, 3), group_size: int | None = 64,
                    symmetric: bool = False, fitness: FitnessConfig | None = None, workers: int = 2):  # fmt: skip
    """``ditq fitness``: the search's fitness of whole ``configs`` on each seed set (``.consistent``: the
    same ranking on every one): see :func:`ditq.workflows.search.compare_fitness`."""
    from ditq.workflows.evaluate import parse_configs
    from ditq.workflows.fitness import FitnessConfig
    from ditq.workflows.search import compare_fitness as _compare

    confs = parse_configs(configs, group_size) if isinstance(configs, str) else list(configs)
    return _compare(check_path(model, "model"), confs, seeds=list(seeds), symmetric=symmetric, fitness=fitness or FitnessConfig(), workers=workers)


def qat(model: str, options: QATOptions, out: str | Path, *, checkpoint: str | Path | None = None, force: bool = False,
        progress: bool = False):  # fmt: skip
    """``ditq qat``: RobuQ quantization-aware training of a digits ``model``, written to the folder ``out``:
    see :func:`ditq.workflows.qat.qat`."""
    from ditq.workflows.qat import qat as _qat

    return _qat(check_path(model, "model"), options, check_path(out, "out"), checkpoint=check_path(checkpoint, "checkpoint", optional=True), force=force, progress=progress)


def train_digits(out: str | Path | None = None, config: TrainConfig | None = None, *, checkpoint: str | Path | None = None, judge_only: bool = False,
                 force: bool = False, progress: bool = False):  # fmt: skip
    """``ditq train-digits``: the digit judge and the digits DiT (``config``: a ``ditq.TrainConfig``; default
    6000 steps) from scratch: see :func:`ditq.workflows.train.train_digits`."""
    from ditq.calib.train import TrainConfig
    from ditq.workflows.train import train_digits as _train

    out, checkpoint = check_path(out, "out", optional=True), check_path(checkpoint, "checkpoint", optional=True)
    return _train(out, config or TrainConfig(steps=6000), checkpoint=checkpoint, judge_only=judge_only, force=force,
                  progress=progress)  # fmt: skip


def _loaded(model):
    """A ``LoadedModel`` as it is, or the one a spec (a name or a path) names."""
    return load_model(check_path(model, "model")) if isinstance(model, (str, os.PathLike)) or not hasattr(model, "pipeline") else model
