"""Q-DiT's evolutionary search over per-layer group sizes, crash-safe and resumable.

Genome: one group size per *gene*; a gene is one input group of a block's activation-quantized linears
(the model family's :class:`~ditq.adapters.Coverage`: DiT's ``to_q``, ``to_k`` and ``to_v`` together, as
they read one activation, Q-DiT's fused ``qkv``; then ``to_out.0``, fc1, fc2: 4 genes per block). A gene's
size applies to the weight rows and the input activation alike. The choices of a gene are the sizes of
the search space that divide its input width.

Cost (documented in the README): per token, a linear ``K -> N`` at ``w``-bit weights and ``a``-bit
activations costs ``N K w a`` BitOPs for the integer products, plus ``N (K / g) * 32 * 32`` for the fp32
rescaling of each group's partial sum (one multiply-add per output and group). Smaller groups cost more.
``--budget g128`` is the cost of every gene at ``g = 128`` (by the formula, even where 128 does not
divide a width); a genome is feasible when its cost is within the budget.

Evolution (Q-DiT's defaults): a random feasible population, then per generation the ``top_k`` best are
kept and ``crossovers`` (uniform, p=0.5) and ``mutations`` (each gene redrawn with p=0.1) are bred from
them. A genome over the budget is repaired by coarsening randomly chosen genes one size at a time
(random genomes of a tight budget are almost never feasible as drawn); already-seen ones are redrawn. Every random draw comes from one seeded generator and
depends on the fitness values only through the ranking, so a rerun with the same seed and the same
fitness values makes the same choices.

Journal: every finished evaluation is appended as one JSON line (flushed and fsynced) *before* the search
uses it. Restarting with the same settings replays the run from the seed and takes every genome already
in the journal from it instead of evaluating again, so an interrupted and an uninterrupted run end at the
same result. An evaluation whose fitness is not a finite number (NaN samples) is journaled as failed,
with a null fitness, and ranks after every other genome: it is never taken again, nor chosen as best.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np

from ditq.adapters import Coverage
from ditq.calib.journal import Journal, evaluation_record, fitness_of, genome_key
from ditq.errors import DitqError, shown
from ditq.options import SEED_MAX, check_float, check_int
from ditq.recipe import Rule

QDIT_SPACE = (32, 64, 128, 192, 288)


@dataclass(frozen=True)
class Gene:
    name: str
    layers: tuple[str, ...]
    in_features: int
    out_features: int  # summed over the gene's layers
    choices: tuple[int, ...]


def genes_of(plans: dict, coverage: Coverage, space: Iterable[int] = QDIT_SPACE) -> list[Gene]:
    """The genes of a resolved recipe's activation-quantized block linears: ``coverage``'s input groups
    (:meth:`~ditq.adapters.Coverage.groups`) whose members all quantize their input."""
    space = sorted(set(int(s) for s in space))
    if not space or space[0] < 1:
        raise DitqError(f"search space must be positive group sizes, got {space}")
    genes = []
    for gname, layers in coverage.groups(n for n, p in plans.items() if p.abits).items():
        ps = [plans[n] for n in layers]
        k = ps[0].in_features
        choices = tuple(s for s in space if k % s == 0)
        if not choices:
            raise DitqError(f"no group size of the search space {space} divides the width {k} of {layers[0]!r}")
        genes.append(Gene(gname, layers, k, sum(p.out_features for p in ps), choices))
    if not genes:
        raise DitqError("the recipe quantizes no block activations: nothing to search")
    return genes


def gene_cost(gene: Gene, g: float, wbits: int, abits: int) -> float:
    """BitOPs per token of one gene at group size ``g`` (see the module docstring)."""
    k, n = gene.in_features, gene.out_features
    return n * k * wbits * abits + n * (k / g) * 32 * 32


def genome_cost(genes: list[Gene], genome: tuple[int, ...], wbits: int, abits: int) -> float:
    return sum(gene_cost(ge, g, wbits, abits) for ge, g in zip(genes, genome))


def parse_budget(text: str, genes: list[Gene], wbits: int, abits: int) -> float:
    """``g128``: the cost of uniform group 128 by the formula; a plain number: BitOPs per token."""
    t = text.strip().lower()
    try:
        n = float(t[1:] if t.startswith("g") else t)
        if not (math.isfinite(n) and n > 0):  # NaN and inf would compare false with every cost
            raise ValueError
        return sum(gene_cost(ge, n, wbits, abits) for ge in genes) if t.startswith("g") else n
    except ValueError:
        raise DitqError(
            f"--budget: expected gN (the cost of uniform group size N) or BitOPs, positive and finite, got {shown(text)}"
        ) from None


def genome_recipe(base, genes: list[Gene], genome: tuple[int, ...]):
    """``base`` with one rule per searched layer setting its group size."""
    rules = tuple(Rule(layer, {"group_size": int(g)}) for ge, g in zip(genes, genome) for layer in ge.layers)
    return replace(base, rules=tuple(base.rules) + rules)


# ------------------------------------------------------------------------------------------- evolution
@dataclass(frozen=True)
class SearchConfig:
    population: int = 50
    generations: int = 10
    top_k: int = 10
    crossovers: int = 25
    mutations: int = 25
    mutation_prob: float = 0.1
    crossover_prob: float = 0.5
    seed: int = 0
    max_tries: int = 2000  # draws per child before giving up on finding a new feasible genome

    def __post_init__(self) -> None:
        for name, lo in (("population", 1), ("generations", 1), ("top_k", 1), ("crossovers", 0), ("mutations", 0), ("max_tries", 1)):
            check_int(getattr(self, name), f"search {name}", lo, 10_000)
        check_int(self.seed, "search seed", 0, SEED_MAX)
        for name in ("mutation_prob", "crossover_prob"):
            check_float(getattr(self, name), f"search {name}", 0.0, 1.0)


@dataclass
class SearchResult:
    best: tuple[int, ...]
    best_record: dict[str, Any]
    evaluated: int  # evaluations run by this call
    reused: int  # evaluations taken from the journal
    history: list[float] = field(default_factory=list)  # best fitness after each generation


EvaluateFn = Callable[[list[tuple[int, ...]]], Iterable[tuple[tuple[int, ...], dict[str, Any]]]]


def evolve(
    genes: list[Gene],
    cfg: SearchConfig,
    budget: float,
    cost: Callable[[tuple[int, ...]], float],
    evaluate: EvaluateFn,
    journal: Journal,
    *,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Run the search; ``evaluate(genomes)`` yields ``(genome, metrics)`` with ``metrics['fitness']``
    (lower is better) in any order as evaluations finish."""
    rng = np.random.default_rng(cfg.seed)
    seen: set[tuple[int, ...]] = set()
    counts = {"evaluated": 0, "reused": 0}

    def feasible(gn):
        return cost(gn) <= budget * (1 + 1e-12)

    def repair(gn):
        """Coarsen random genes one notch until the genome fits the budget (None if it cannot)."""
        gn = list(gn)
        while not feasible(tuple(gn)):
            up = [i for i, (ge, g) in enumerate(zip(genes, gn)) if g < ge.choices[-1]]
            if not up:
                return None
            i = up[int(rng.integers(len(up)))]
            gn[i] = next(c for c in genes[i].choices if c > gn[i])
        return tuple(gn)

    def draw(make):
        for _ in range(cfg.max_tries):
            gn = repair(make())
            if gn is not None and gn not in seen:
                seen.add(gn)
                return gn
        return None

    def score(genomes: list[tuple[int, ...]], generation: int) -> None:
        todo = [g for g in genomes if genome_key(g) not in journal.records]
        counts["reused"] += len(genomes) - len(todo)
        if todo:
            for gn, metrics in evaluate(todo):
                rec = evaluation_record(gn, cost(gn), generation, metrics)
                journal.add(rec)  # durable before use
                counts["evaluated"] += 1
                if on_result:
                    on_result(rec)

    def fitness(gn):
        return fitness_of(journal.records[genome_key(gn)])

    population = [g for g in (draw(lambda: tuple(int(rng.choice(ge.choices)) for ge in genes)) for _ in range(cfg.population)) if g]
    if not population:
        raise DitqError("no genome of the search space fits the budget; raise --budget or add larger group sizes")
    score(population, 0)
    history = [min(fitness(g) for g in population)]
    for gen in range(1, cfg.generations):
        parents = sorted(population, key=lambda g: (fitness(g), genome_key(g)))[: cfg.top_k]

        def crossover():
            a, b = rng.choice(len(parents), 2, replace=len(parents) < 2)
            pick = rng.random(len(genes)) < cfg.crossover_prob
            return tuple(int(x) if p else int(y) for x, y, p in zip(parents[a], parents[b], pick))

        def mutate():
            p = parents[int(rng.integers(len(parents)))]
            flip = rng.random(len(genes)) < cfg.mutation_prob
            return tuple(int(rng.choice(ge.choices)) if f else int(x) for ge, x, f in zip(genes, p, flip))

        children = [g for g in (draw(crossover) for _ in range(cfg.crossovers)) if g]
        children += [g for g in (draw(mutate) for _ in range(cfg.mutations)) if g]
        score(children, gen)
        population = parents + children
        history.append(min(fitness(g) for g in population))
    best = min(population, key=lambda g: (fitness(g), genome_key(g)))
    if not math.isfinite(fitness(best)):
        raise DitqError(f"every genome evaluated failed ({journal.records[genome_key(best)]['failed']}); no recipe to choose")
    return SearchResult(best, journal.records[genome_key(best)], counts["evaluated"], counts["reused"], history)


def settings_dict(**kw) -> dict[str, Any]:
    return {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in kw.items()}
