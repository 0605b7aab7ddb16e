"""The PyTorch reference: the float model with every covered layer swapped for the module computing
exactly what the exported ONNX graph computes.

:func:`quantize_model` finds the integer weights of every covered layer; :meth:`QuantizedDiT.reference`
swaps each linear for a :class:`~ditq.calib.qlinear.QuantLinear` (``y = Q_a(x H) dq(Q(W H))^T + b``,
with the dynamic per-token, per-group activation quantization recomputed from the input at every call)
and each embedding table for a :class:`~ditq.calib.qlinear.QuantEmbedding`. The numerics are
:mod:`ditq.calib.numerics`, the same functions whose codes ONNX Runtime reproduces bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ditq.calib.numerics import QuantizedTensor
from ditq.calib.qlinear import QuantEmbedding, QuantLinear, quantize_weight, swap_module
from ditq.errors import DitqError
from ditq.graphs.targets import QDQ, RecordedTarget, Target, as_target
from ditq.recipe import LayerPlan, Recipe


@dataclass
class QuantizedDiT:
    """A float DiT, its resolved recipe and the integer weights of every covered layer."""

    model: nn.Module
    recipe: Recipe
    plans: dict[str, LayerPlan]
    weights: dict[str, QuantizedTensor] = field(default_factory=dict)
    target: Target | RecordedTarget = QDQ  # what the graph runs on; ``plans`` are its effective ones

    def modules(self) -> Iterator[tuple[str, nn.Module, LayerPlan]]:
        named = dict(self.model.named_modules())
        for name, plan in self.plans.items():
            yield name, named[name], plan

    def reference(self, inplace: bool = False) -> nn.Module:
        """The reference model; ``inplace=True`` swaps the modules of ``self.model`` (saves a copy)."""
        model = self.model if inplace else copy.deepcopy(self.model)
        for name, plan in self.plans.items():
            w = self.weights[name].dequantize()
            if plan.kind == "linear":
                new = QuantLinear(w, model.get_submodule(name).bias, plan)
            else:
                new = QuantEmbedding(w)
            swap_module(model, name, new)
        return model.eval()


def resolve_plans(model: nn.Module, recipe: Recipe, target: Target | RecordedTarget | str = QDQ) -> dict[str, LayerPlan]:
    """The layer plans of ``recipe`` on ``model``, as ``target`` (or the target of that name) computes them."""
    return as_target(target).effective_plans(recipe.resolve(model))


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    progress: bool = True,
    calibration: dict[str, torch.Tensor] | None = None,
    target: Target | RecordedTarget | str = QDQ,
) -> QuantizedDiT:
    """Resolve ``recipe`` on ``model`` for ``target`` and quantize every covered weight: round to nearest,
    or, for ``method: gptq``, GPTQ with each linear's Hessian taken from its ``calibration`` inputs
    ``[rows, K]`` after the layer's own activation quantization (what the layer sees at inference).
    Embedding tables have no input to calibrate on and are always rounded to nearest. Under target
    ``ort`` each layer takes the plan of the kernel it is lowered to (its weights and the activation
    arithmetic of that kernel), so the reference emulates the kernel. Each layer's weight quantizer is
    :func:`ditq.calib.qlinear.choose_weight_quantizer`'s."""
    target = as_target(target)
    plans = resolve_plans(model, recipe, target)
    qd = QuantizedDiT(model, recipe, plans, target=target)
    gptq = recipe.method == "gptq"
    if gptq:
        missing = [n for n, p in plans.items() if p.kind == "linear" and (calibration is None or n not in calibration)]
        if missing:
            raise DitqError(f"recipe method gptq needs calibration inputs; none for layer {missing[0]!r}")
    desc = "GPTQ" if gptq else "quantize weights"
    for name, module, plan in tqdm(list(qd.modules()), desc=desc, unit="layer", disable=not progress):
        qd.weights[name] = quantize_weight(module.weight, plan, recipe.method, (calibration or {}).get(name))
    return qd

