"""Fitness of a quantization recipe on the ``digits`` model, evaluated in parallel worker processes.

A candidate is quantized with RTN (as Q-DiT's search does) and sampled through the fast PyTorch
reference from the same noise and labels as every other candidate. Its fitness (lower is better) is

    fitness = FID-digits(samples, held-out digits) + rmse_weight * RMSE(samples, float samples)

where the float samples come from the same noise. The second term is the distance to what the float
model draws from the same start: it is far less noisy than FID on a few hundred samples, and makes the
fitness separate configurations whose FIDs lie within each other's noise. Samples holding NaN or Inf
(a candidate whose sampling diverged) get NaN for every metric: the judge does not score them.

A text-conditioned digits model (``digits-t2i``: its pipeline names the ``digits-t2i`` judge) is sampled
from its TRAINING paraphrases (:func:`~ditq.calib.conditioning.calibration_prompts`: sample ``i`` asks for
digit ``i mod 10``), never the held-out ones ``ditq eval`` judges it on, encoded once by its float text
encoder and guided with the empty prompt at ``cfg`` (:func:`~ditq.calib.calibration.sample_prompts`: its own
flow-matching Euler steps); the judge scores its 16x16 samples 2x2-pooled to 8x8.

Workers (``spawn``ed, one torch thread each) load the model, the judge, the real features and the float
samples once, then evaluate genomes sent to them.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

import numpy as np
import torch

from ditq.adapters import adapter_for
from ditq.calib.calibration import sample_prompts
from ditq.calib.conditioning import PromptConditioning, calibration_prompts, trajectory_conditioning
from ditq.calib.digits import load_split, to_unit_range
from ditq.calib.digits_prompts import NUM_DIGITS
from ditq.calib.search import genome_recipe
from ditq.exporter.reference import quantize_model
from ditq.errors import DitqError
from ditq.models import LoadedModel, load_model
from ditq.options import MAX_CFG, MAX_SAMPLES, MAX_STEPS, SEED_MAX, check_float, check_int
from ditq.pipeline import JUDGES, TEXT_JUDGES
from ditq.recipe import Recipe
from ditq.runtime.metrics import DigitJudge, fid, pool_to
from ditq.runtime.samplers import sample, seeded_noise


@dataclass(frozen=True)
class FitnessConfig:
    num_samples: int = 250
    steps: int = 25
    cfg: float = 1.5
    seed: int = 777
    rmse_weight: float = 20.0

    def __post_init__(self) -> None:
        check_int(self.num_samples, "fitness num_samples", 1, MAX_SAMPLES)
        check_int(self.steps, "fitness steps", 1, MAX_STEPS)
        check_int(self.seed, "fitness seed", 0, SEED_MAX)
        check_float(self.rmse_weight, "fitness rmse_weight", 0.0, 1e6)
        check_float(self.cfg, "fitness cfg", 0.0, MAX_CFG)


_W: dict[str, Any] = {}  # per-worker state


def fitness_conditioning(loaded: LoadedModel, cfg: FitnessConfig) -> PromptConditioning | None:
    """The prompts a text model's fitness samples (module docstring), guided at ``cfg.cfg``; None for a
    class-conditioned model. A text model no digit judge scores is refused in one line."""
    if adapter_for(loaded.model).conditioning(dict(loaded.model.config)) is not None:
        return None
    if loaded.pipeline.judge not in TEXT_JUDGES:
        raise DitqError(f"the search's fitness judges digits; {type(loaded.model).__name__} is a text-to-image model whose pipeline "
                        "names no digits-t2i judge: export it with a uniform --group-size")  # fmt: skip
    cond = trajectory_conditioning(loaded, "the search's fitness samples the model from prompts", "export with a uniform --group-size",
                                   prompts=calibration_prompts(loaded.pipeline))  # fmt: skip
    return replace(cond, guidance=float(cfg.cfg))


def _init(model_spec: str, base_recipe_json: str | None, genes, fcfg: dict, threads: int) -> None:
    torch.set_num_threads(threads)

    cfg = FitnessConfig(**fcfg)
    loaded = load_model(model_spec)
    judge = DigitJudge.load()
    text = fitness_conditioning(loaded, cfg)
    _W.update(
        model=loaded.model,
        labels=np.arange(cfg.num_samples) % (NUM_DIGITS if text else loaded.pipeline.conditioning.num_classes),
        base=Recipe.from_json(base_recipe_json) if base_recipe_json else None,
        genes=genes,
        cfg=cfg,
        judge=judge,
        real=judge.features(to_unit_range(load_split().x_test)),
        clip=loaded.pipeline.clip_denoised,
        null_label=None if text else loaded.pipeline.conditioning.null_label,
        schedule=loaded.schedule,
        text=text,
    )
    _W["float"] = _sample(loaded.model)


def _sample(model) -> np.ndarray:
    """The fitness samples of ``model`` (the float model or a quantized reference), from the fitness seed."""
    cfg: FitnessConfig = _W["cfg"]
    if _W["text"] is not None:
        return sample_prompts(model, _W["text"], num_samples=cfg.num_samples, steps=cfg.steps, seed=cfg.seed, schedule=_W["schedule"],
                              clip_denoised=_W["clip"])  # fmt: skip
    mc = dict(_W["model"].config)
    noise = seeded_noise(cfg.seed, cfg.num_samples, mc["in_channels"], mc["sample_size"])
    return sample(adapter_for(model).torch_callable(model), noise, _W["labels"], schedule=_W["schedule"], steps=cfg.steps, method="ddim",
                  cfg=cfg.cfg, null_class=_W["null_label"], clip_denoised=_W["clip"])  # fmt: skip


def metrics_of(x: np.ndarray) -> dict[str, float]:
    cfg: FitnessConfig = _W["cfg"]
    if not np.isfinite(x).all():  # sampling diverged: no score (the search journals the genome as failed)
        nan = float("nan")
        return {"fid": nan, "rmse": nan, "class_accuracy": nan, "fitness": nan}
    imgs = to_unit_range(x)
    if _W["text"] is not None:  # the digits-t2i judge: 16x16 samples pooled to the digit judge's 8x8
        imgs = pool_to(imgs, JUDGES["digits"][1])
    f = fid(_W["judge"].features(imgs), _W["real"])
    rmse = float(np.sqrt(np.mean((x - _W["float"]) ** 2)))
    return {"fid": f, "rmse": rmse, "class_accuracy": _W["judge"].accuracy(imgs, _W["labels"]), "fitness": f + cfg.rmse_weight * rmse}


def _eval(genome: tuple[int, ...]) -> tuple[tuple[int, ...], dict[str, float]]:
    recipe = genome_recipe(_W["base"], _W["genes"], genome)
    ref = quantize_model(_W["model"], recipe, progress=False).reference()
    return genome, metrics_of(_sample(ref))


def _eval_recipe(item: tuple[str, str]) -> tuple[str, dict[str, float]]:
    name, recipe_json = item
    ref = quantize_model(_W["model"], Recipe.from_json(recipe_json), progress=False).reference()
    return name, metrics_of(_sample(ref))


class ParallelFitness:
    """``evaluate(genomes)`` for :func:`ditq.calib.search.evolve`, over ``workers`` processes; genomes
    apply to ``base_recipe`` through ``genes``. Without them, only :meth:`recipes` is available."""

    def __init__(self, model_spec: str, base_recipe=None, genes=(), cfg: FitnessConfig = FitnessConfig(), workers: int = 2):
        self.workers = max(1, workers)
        args = (model_spec, base_recipe.to_json() if base_recipe else None, list(genes), asdict(cfg), 1 if self.workers > 1 else 2)
        if self.workers == 1:
            _init(*args)
            self.pool = None
        else:
            self.pool = mp.get_context("spawn").Pool(self.workers, initializer=_init, initargs=args)

    def __call__(self, genomes: list[tuple[int, ...]]) -> Iterable[tuple[tuple[int, ...], dict[str, float]]]:
        if self.pool is None:
            for g in genomes:
                yield _eval(g)
        else:
            yield from self.pool.imap_unordered(_eval, genomes)

    def recipes(self, named: dict[str, Any]) -> dict[str, dict[str, float]]:
        """Fitness of whole recipes (``name -> Recipe``), e.g. to check the fitness separates them."""
        items = [(n, r.to_json()) for n, r in named.items()]
        if self.pool is None:
            return dict(_eval_recipe(i) for i in items)
        return dict(self.pool.imap_unordered(_eval_recipe, items))

    def close(self, abort: bool = False) -> None:
        """Let the workers finish and exit cleanly, or stop them at once (``abort``, on errors)."""
        if self.pool is not None:
            if abort:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None
