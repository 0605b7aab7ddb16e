"""Per-layer sensitivity: how much the model's output moves when only one block unit (one input group of the
family's coverage: the layers that read one input, e.g. q/k/v) is quantized.

:func:`unit_errors` swaps each unit's members for the :class:`~ditq.calib.qlinear.QuantLinear` of a layer
plan (``Q_a(x H) dq(Q(W H))^T + b``: the exported layer's arithmetic, weights by round to nearest), runs one
forward on the model's own inputs, and records ``|f_u(x) - f(x)|^2 / |f(x)|^2`` against the float model,
then swaps the float layers back. RobuQ's mixed activation bits (:mod:`ditq.calib.robuq`) measure it with
activation-only plans at several bit widths; ``ditq sensitivity`` (:mod:`ditq.workflows.sensitivity`) with
Q-DiT plans at several group sizes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from ditq.adapters import adapter_for
from ditq.calib.qlinear import QuantLinear, plan_weight, quantize_weight, swap_module
from ditq.errors import DitqError
from ditq.recipe import LayerPlan


def block_units(model) -> dict[str, tuple[str, ...]]:
    """The activation quantizers of the block linears, by unit: the input groups of the model family's
    coverage (:meth:`ditq.adapters.Coverage.groups`; DiT: q/k/v share one input, one unit of three
    layers, then the attention output, fc1 and fc2 of every block)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return adapter_for(model).coverage.groups(names)


def unit_stream(model) -> dict[str, str]:
    """Each unit's stream (image, text or joint tokens: :attr:`ditq.adapters.InputGroup.stream`)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return adapter_for(model).coverage.streams(names)


def _layer(lin: torch.nn.Linear, plan: LayerPlan) -> QuantLinear:
    w = lin.weight.detach().float()
    weight = quantize_weight(w, plan).dequantize() if plan.quant.wbits is not None else plan_weight(w, plan)
    return QuantLinear(weight, lin.bias, plan)


def unit_errors(model, inputs: tuple[torch.Tensor, ...], plans: Mapping[Any, Mapping[str, LayerPlan]], *,
                progress: bool = False, desc: str = "sensitivity") -> dict[str, dict[Any, float]]:  # fmt: skip
    """``unit -> option -> |f_u(x) - f(x)|^2 / |f(x)|^2``: the output error with only unit ``u``'s members
    swapped for their plan under ``plans[option]`` (module name -> plan; every member of every unit must
    have one), ``inputs`` the model's graph inputs in its family adapter's order."""
    units = block_units(model)
    forward = adapter_for(model).wrap(model)
    for option, by_name in plans.items():
        missing = [m for members in units.values() for m in members if m not in by_name]
        if missing:
            raise DitqError(f"sensitivity option {option!r}: no layer plan for {missing[0]}")
    out: dict[str, dict[Any, float]] = {}
    with torch.no_grad():
        ref = forward(*inputs)
        norm = float((ref.double() ** 2).sum())
        for unit, members in tqdm(list(units.items()), desc=desc, unit="unit", disable=not progress):
            out[unit] = {}
            floats = {m: model.get_submodule(m) for m in members}
            for option, by_name in plans.items():
                for m, lin in floats.items():
                    swap_module(model, m, _layer(lin, by_name[m]))
                try:
                    o = forward(*inputs)
                finally:
                    for m, lin in floats.items():
                        swap_module(model, m, lin)
                out[unit][option] = float(((o - ref).double() ** 2).sum()) / norm
    return out
