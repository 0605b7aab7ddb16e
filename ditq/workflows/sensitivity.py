"""``ditq sensitivity``: which block layers a Q-DiT configuration hurts most, and which stream needs finer groups.

For every unit of the model family's coverage (one input group: the layers that read one input and share its
activation quantizer, e.g. q/k/v) and every group size ``g`` asked for, only that unit is quantized as Q-DiT
quantizes it (weights round-to-nearest at ``wbits`` in groups of ``g`` input channels, dynamic per-group
``abits`` activations) and the model's output error is measured against the float model on its own inputs
along its float sampling trajectories (a text model's on its calibration prompts):
``|f_u(x) - f(x)|^2 / |f(x)|^2`` (:func:`ditq.calib.sensitivity.unit_errors`).

Each unit carries its stream (image tokens, text tokens, or both concatenated: the adapter's
:attr:`~ditq.adapters.InputGroup.stream`). The summary gives each stream's median error per group size and
how much it drops from the largest to the smallest group size: a stream whose error falls much more with
finer groups is the one finer groups pay for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ditq.adapters import adapter_for
from ditq.calib.conditioning import trajectory_conditioning
from ditq.calib.robuq import sensitivity_inputs
from ditq.calib.sensitivity import block_units, unit_errors, unit_stream
from ditq.errors import DitqError
from ditq.exporter.reference import resolve_plans
from ditq.models import load_model
from ditq.recipe import Recipe, Rule


@dataclass
class SensitivityReport:
    model: str
    wbits: int
    abits: int | None
    group_sizes: list[int]
    rows: list[dict[str, Any]]  # unit, stream, members, errors {g: relative output error}
    inputs: int  # model inputs the errors are measured on

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per stream: units, the median error at each group size, and the median's drop from the largest
        group size to the smallest (how much finer groups help that stream)."""
        out = {}
        for stream in dict.fromkeys(r["stream"] for r in self.rows):
            errs = {g: float(np.median([r["errors"][str(g)] for r in self.rows if r["stream"] == stream])) for g in self.group_sizes}
            lo, hi = min(self.group_sizes), max(self.group_sizes)
            out[stream] = {"units": sum(r["stream"] == stream for r in self.rows), "median": errs,
                           "finer_gain": errs[hi] / errs[lo] if errs[lo] > 0 else float("inf")}  # fmt: skip
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}

    def table(self) -> str:
        a = "fp" if self.abits is None else self.abits
        gs = self.group_sizes
        head = f"{'unit':<44} {'stream':<6} " + " ".join(f"{'g' + str(g):>10}" for g in gs) + f" {'rank':>5}"
        worst = max(gs)
        order = sorted(range(len(self.rows)), key=lambda i: -self.rows[i]["errors"][str(worst)])
        rank = {i: k + 1 for k, i in enumerate(order)}
        lines = [f"{self.model}: W{self.wbits}A{a}, one unit quantized at a time; relative output error |f_u - f|^2 / |f|^2 "
                 f"on {self.inputs} inputs of the float sampling trajectories (rank: by the g{worst} error)", head, "-" * len(head)]  # fmt: skip
        for i, r in enumerate(self.rows):
            lines.append(f"{r['unit']:<44} {r['stream']:<6} " + " ".join(f"{r['errors'][str(g)]:>10.2e}" for g in gs) + f" {rank[i]:>5}")
        lines.append("median per stream: " + "; ".join(
            f"{s} ({v['units']} units) " + ", ".join(f"g{g} {v['median'][g]:.2e}" for g in gs) + f", g{max(gs)}/g{min(gs)} {v['finer_gain']:.2f}x"
            for s, v in self.summary().items()))  # fmt: skip
        return "\n".join(lines)


def _unit_recipe(coverage, wbits: int, abits: int | None, group: int, symmetric: bool) -> Recipe:
    """Q-DiT's recipe with group size ``group`` on the block units (the other layers per channel: only the
    units' plans are used, and a group size need not divide the embedders' widths)."""
    base = Recipe.qdit(coverage, wbits, abits, None, symmetric)
    return replace(base, rules=(*base.rules, *(Rule(p, {"group_size": group}) for p in coverage.activation_linears)))


def layer_sensitivity(model_spec: str, *, wbits: int = 4, abits: int | None = 4, group_sizes: list[int] = (32, 64, 128),
                      symmetric: bool = False, progress: bool = True) -> SensitivityReport:  # fmt: skip
    """The per-unit sensitivity of ``model_spec`` to Q-DiT's W``wbits``A``abits`` at each of ``group_sizes``
    (module docstring). A group size that does not divide a unit's input width is refused in one line
    naming the layer (as export refuses it); the layers outside the units do not take it."""
    group_sizes = sorted(set(group_sizes))
    if not group_sizes:
        raise DitqError("--group-sizes: give at least one group size")
    loaded = load_model(model_spec)
    model = loaded.model
    adapter = adapter_for(model)
    cond = trajectory_conditioning(loaded, "ditq sensitivity measures on the model's sampling trajectories",
                                   "use a model with its pipeline folder")  # fmt: skip
    coverage = adapter.coverage_of(model)
    plans = {g: resolve_plans(model, _unit_recipe(coverage, wbits, abits, g, symmetric)) for g in group_sizes}
    inputs = sensitivity_inputs(model, clip_denoised=loaded.pipeline.clip_denoised, schedule=loaded.schedule, conditioning=cond)
    errors = unit_errors(model, inputs, plans, progress=progress)
    streams, units = unit_stream(model), block_units(model)
    rows = [{"unit": u, "stream": streams[u], "members": list(units[u]), "errors": {str(g): e for g, e in errs.items()}}
            for u, errs in errors.items()]  # fmt: skip
    return SensitivityReport(model_spec, wbits, abits, list(group_sizes), rows, len(inputs[0]))
