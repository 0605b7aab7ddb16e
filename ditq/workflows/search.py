"""``ditq search`` and ``ditq fitness`` as a library: Q-DiT's group-size search on a model, and the
search's fitness of whole configurations on several seed sets.

:func:`prepare_search` loads the model, derives the genes (one per searched block linear, the base
recipe's activation-quantized ones; see :mod:`ditq.calib.search`) and the budget, and opens the journal;
:meth:`SearchRun.run` evolves (:func:`ditq.calib.search.evolve`) with the fitness of
:mod:`ditq.workflows.fitness`, evaluated in worker processes started only when a genome is not in the
journal already. The outcome carries the best recipe, written with the requested weight method, and the
journal's evaluations ranked best first.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ditq.adapters import adapter_for
from ditq.calib.journal import Journal, fitness_of
from ditq.calib.search import (
    QDIT_SPACE, Gene, SearchConfig, SearchResult, evolve, genes_of, genome_cost, genome_recipe, parse_budget, settings_dict,
)  # fmt: skip
from ditq.errors import DitqError, shown
from ditq.flow import FlowMatchSpec
from ditq.models import load_model
from ditq.options import SEED_MAX, check_int
from ditq.recipe import METHODS, Recipe
from ditq.workflows.evaluate import EvalConfig
from ditq.workflows.fitness import FitnessConfig, ParallelFitness, fitness_conditioning


@dataclass(frozen=True)
class SearchOptions:
    """A search's settings. The base recipe is ``Recipe.qdit(coverage, wbits, abits, group_size, symmetric)``; its
    activation-quantized block linears are searched over ``space``, within ``budget`` (``gN``: the cost of
    uniform group size N; or BitOPs per token). ``method`` is written into the best recipe."""

    wbits: int = 4
    abits: int = 8
    group_size: int | None = 64
    symmetric: bool = False
    space: tuple[int, ...] = QDIT_SPACE
    budget: str = "g128"
    search: SearchConfig = SearchConfig()
    fitness: FitnessConfig = FitnessConfig()
    workers: int = 2
    method: str = "gptq"

    def __post_init__(self) -> None:
        for name in ("wbits", "abits", "group_size"):  # their ranges: the recipe names what is out of range
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) and not (name == "group_size" and v is None):
                raise DitqError(f"{name}: expected an integer, got {shown(v)}")
        if not isinstance(self.space, (tuple, list)) or not self.space:
            raise DitqError(f"space: expected group sizes, got {shown(self.space)}")
        object.__setattr__(self, "space", tuple(check_int(s, "space", 1, 2**20) for s in self.space))
        if not isinstance(self.budget, str):
            raise DitqError(f"budget: expected gN or a number of BitOPs as text, got {shown(self.budget)}")
        if not isinstance(self.search, SearchConfig):  # SearchConfig and FitnessConfig check their fields
            raise DitqError(f"search: expected a SearchConfig, got {shown(self.search)}")
        if not isinstance(self.fitness, FitnessConfig):
            raise DitqError(f"fitness: expected a FitnessConfig, got {shown(self.fitness)}")
        check_int(self.workers, "workers", 1, 256)
        if self.method not in METHODS:
            raise DitqError(f"method: expected one of {list(METHODS)}, got {shown(self.method)}")


@dataclass(frozen=True)
class SearchOutcome:
    recipe: Recipe  # the best genome's recipe, with the requested method
    result: SearchResult  # best genome and record, evaluations run now and reused from the journal
    genes: list[Gene]
    budget: float
    cost: float  # the best genome's cost
    ranking: list[dict[str, Any]]  # every journal record, best fitness first (failed ones last)
    seconds: float

    def summary(self) -> str:
        r, res = self.result.best_record, self.result
        return (f"best of {len(self.ranking)} evaluated genomes ({res.evaluated} now, {res.reused} from the journal): "
                f"fitness {r['fitness']:.3f} (FID-digits {r['fid']:.2f}, RMSE vs float {r['rmse']:.4f}), "
                f"cost {self.cost / self.budget:.3f} of the budget, in {self.seconds:.0f} s\n"
                "group sizes: " + ", ".join(f"{re.sub(r'^.*?[.](?=[0-9]+[.])', '', ge.name, count=1)}={g}" for ge, g in zip(self.genes, res.best)))  # fmt: skip


class SearchRun:
    """A search ready to run: model loaded, genes and budget derived, journal opened (``notes``: what
    opening it repaired, e.g. a line a killed run cut short)."""

    def __init__(self, model_spec: str, options: SearchOptions, journal: str | Path):
        self.t0 = time.perf_counter()
        o = self.options = options
        self.model_spec = model_spec
        loaded = load_model(model_spec)
        fitness_conditioning(loaded, o.fitness)  # a model the fitness cannot judge: refused here, not in a worker
        coverage = adapter_for(loaded.model).coverage_of(loaded.model)
        self.base = Recipe.qdit(coverage, o.wbits, o.abits, o.group_size, o.symmetric)
        self.genes = genes_of(self.base.resolve(loaded.model), coverage, o.space)
        self.budget = parse_budget(o.budget, self.genes, o.wbits, o.abits)
        settings = settings_dict(model=loaded.source, base=self.base.to_dict(), space=[list(g.choices) for g in self.genes],
                                 budget=self.budget, search=o.search, fitness=o.fitness)  # fmt: skip
        self.journal = Journal(journal, settings, metrics=("fid", "rmse"))  # the two the summary reports
        self.notes: list[str] = list(self.journal.notes)

    def cost(self, genome: tuple[int, ...]) -> float:
        return genome_cost(self.genes, genome, self.options.wbits, self.options.abits)

    def run(self, *, progress: bool = False) -> SearchOutcome:
        o, journal = self.options, self.journal
        expected = o.search.population + (o.search.generations - 1) * (o.search.crossovers + o.search.mutations)
        bar = tqdm(total=expected, desc="search", unit="eval", initial=0, disable=not progress)
        best = [min((fitness_of(r) for r in journal.records.values()), default=float("inf"))]
        bar.update(len(journal.records))
        pool: list[ParallelFitness] = []  # started on the first genome the journal does not hold

        def on_result(rec):
            best[0] = min(best[0], fitness_of(rec))
            bar.update()
            bar.set_postfix(best=f"{best[0]:.3f}", fid="failed" if rec.get("failed") else f"{rec['fid']:.2f}")

        def evaluate(genomes):
            if not pool:
                pool.append(ParallelFitness(self.model_spec, self.base, self.genes, o.fitness, workers=o.workers))
            return pool[0](genomes)

        ok = False
        try:
            res = evolve(self.genes, o.search, self.budget, self.cost, evaluate, journal, on_result=on_result)
            ok = True
        finally:
            bar.close()
            for p in pool:
                p.close(abort=not ok)
        ranking = sorted(journal.records.values(), key=lambda r: (fitness_of(r), r["key"]))
        recipe = replace(genome_recipe(self.base, self.genes, res.best), method=o.method)
        return SearchOutcome(recipe, res, self.genes, self.budget, self.cost(res.best), ranking, time.perf_counter() - self.t0)


def prepare_search(model_spec: str, options: SearchOptions, journal: str | Path) -> SearchRun:
    """The search of ``model_spec`` under ``options``, journaled (and resumed from) ``journal``."""
    if not isinstance(options, SearchOptions):
        raise DitqError(f"options: expected SearchOptions, got {shown(options)}")
    return SearchRun(model_spec, options, journal)


def search(model_spec: str, options: SearchOptions, journal: str | Path, *, progress: bool = False) -> SearchOutcome:
    """:func:`prepare_search`, then run it."""
    return prepare_search(model_spec, options, journal).run(progress=progress)


@dataclass(frozen=True)
class FitnessComparison:
    fitness: FitnessConfig  # the settings (its seed is replaced by each of ``seeds``)
    seeds: list[int]
    rows: dict[str, list[dict[str, Any]]]  # config -> per seed set: seed, fid, rmse, class_accuracy, fitness
    rankings: list[list[str]] = field(default_factory=list)  # per seed set, best first
    consistent: bool = True  # the same ranking on every seed set
    sampler: str = "DDIM"  # how the fitness samples: DDIM, or a flow-matching model's Euler steps

    def table(self) -> str:
        f, seeds = self.fitness, self.seeds
        lines = [f"fitness = FID-digits + {f.rmse_weight} x RMSE vs float; {f.num_samples} samples, {self.sampler}-{f.steps}, seed sets {seeds}",
                 f"{'config':<12} " + " ".join(f"{'seed ' + str(s):>22}" for s in seeds)]  # fmt: skip
        for n, per in self.rows.items():
            lines.append(f"{n:<12} " + " ".join(f"{m['fitness']:>8.3f} ({m['fid']:.2f}, {m['rmse']:.3f})" for m in per))
        lines.append(f"ranking (best first): {' < '.join(self.rankings[0])}; "
                     f"{'the same' if self.consistent else 'NOT the same'} on every seed set")  # fmt: skip
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "rankings": self.rankings, "consistent": self.consistent}


def compare_fitness(model_spec: str, configs: list[EvalConfig], *, seeds: list[int] = (1, 2, 3), symmetric: bool = False,
                    fitness: FitnessConfig = FitnessConfig(), workers: int = 2) -> FitnessComparison:  # fmt: skip
    """The search's fitness of whole ``configs`` of ``model_spec`` on each seed set: can it tell them apart?"""
    if not isinstance(fitness, FitnessConfig):
        raise DitqError(f"fitness: expected a FitnessConfig, got {shown(fitness)}")
    check_int(workers, "workers", 1, 256)
    seeds = [check_int(s, "seeds", 0, SEED_MAX) for s in seeds]
    if not seeds:
        raise DitqError("seeds is empty")
    loaded = load_model(model_spec)
    fitness_conditioning(loaded, fitness)
    sampler = "Euler" if isinstance(loaded.schedule, FlowMatchSpec) else "DDIM"
    named = {c.name: c.build(loaded, symmetric).recipe for c in configs}  # fails here, not inside a worker
    del loaded
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in named}
    for s in seeds:
        pool = ParallelFitness(model_spec, cfg=replace(fitness, seed=s), workers=workers)
        ok = False
        try:
            for n, m in pool.recipes(named).items():
                rows[n].append({"seed": s, **m})
            ok = True
        finally:
            pool.close(abort=not ok)
    ranks = [sorted(named, key=lambda n: rows[n][i]["fitness"]) for i in range(len(seeds))]
    return FitnessComparison(fitness, seeds, rows, ranks, all(r == ranks[0] for r in ranks), sampler)
