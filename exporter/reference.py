"""The PyTorch reference: the float model with every covered layer swapped for the module computing
exactly what the exported ONNX graph computes.

:func:`quantize_model` finds the integer weights of every covered layer; :meth:`QuantizedDiT.reference`
swaps each linear for a :class:`~ditq.calib.qlinear.QuantLinear` (``y = Q_a(x H) dq(Q(W H))^T + b``,
with the dynamic per-token, per-group activation quantization recomputed from the input at every call)
and each embedding table for a :class:`~ditq.calib.qlinear.QuantEmbedding`. The numerics are
:mod:`ditq.calib.numerics`, the same functions whose codes ONNX Runtime reproduces bit for bit.

``quantize_model(..., consume=True)`` (what ``ditq export`` runs) defers the quantization to the export:
:meth:`QuantizedDiT.quantize_pending`, called once the float graph is traced, quantizes one layer at a
time and moves each float weight to the meta device as soon as its codes exist, so the float weights and
the codes are never in memory together (the export's peak is the float model's, see
:mod:`ditq.workflows.export_memory`). The model is then used up: it holds no weights.
"""

from __future__ import annotations

import copy
from collections import Counter
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
    """A float DiT, its resolved recipe and the integer weights of every covered layer (with ``consume``:
    of the layers quantized so far, see :meth:`quantize_pending`)."""

    model: nn.Module
    recipe: Recipe
    plans: dict[str, LayerPlan]
    weights: dict[str, QuantizedTensor] = field(default_factory=dict)
    target: Target | RecordedTarget = QDQ  # what the graph runs on; ``plans`` are its effective ones
    calibration: dict[str, torch.Tensor] | None = None  # GPTQ's inputs of the layers not quantized yet
    consume: bool = False  # the export uses up the model's weights (quantize_pending) and then these codes

    def modules(self) -> Iterator[tuple[str, nn.Module, LayerPlan]]:
        named = dict(self.model.named_modules())
        for name, plan in self.plans.items():
            yield name, named[name], plan

    def quantize_pending(self, progress: bool = False) -> None:
        """Quantize every covered layer that has no weights yet (see :func:`quantize_model`). With
        ``consume``, each float weight goes to the meta device once no pending layer reads it, and then
        every parameter and buffer of the model: call it only when nothing needs them any more."""
        pending = [(n, m, p) for n, m, p in self.modules() if n not in self.weights]
        readers = Counter(id(m.weight) for _, m, _ in pending)  # a weight shared by two layers stays until both have codes
        desc = "GPTQ" if self.recipe.method == "gptq" else "quantize weights"
        for name, module, plan in tqdm(pending, desc=desc, unit="layer", disable=not progress):
            self.weights[name] = quantize_weight(module.weight, plan, self.recipe.method, (self.calibration or {}).get(name))
            readers[id(module.weight)] -= 1
            if self.consume and not readers[id(module.weight)]:
                module.to("meta")
        self.calibration = None
        if self.consume:
            self.model.to("meta")

    def reference(self, inplace: bool = False) -> nn.Module:
        """The reference model; ``inplace=True`` swaps the modules of ``self.model`` (saves a copy)."""
        if self.consume:
            raise RuntimeError("a QuantizedDiT made with consume=True gives its model's weights to the export; quantize without it")
        model = self.model if inplace else copy.deepcopy(self.model)
        for name, plan in self.plans.items():
            swap_module(model, name, reference_module(model.get_submodule(name), plan, self.weights[name]))
        return model.eval()


def reference_module(float_module: nn.Module, plan: LayerPlan, codes: QuantizedTensor) -> nn.Module:
    """The reference module of one covered layer: a :class:`QuantLinear` of the dequantized ``codes`` (and
    ``float_module``'s bias), or a :class:`QuantEmbedding` of the dequantized table."""
    w = codes.dequantize()
    return QuantLinear(w, float_module.bias, plan) if plan.kind == "linear" else QuantEmbedding(w)


def resolve_plans(model: nn.Module, recipe: Recipe, target: Target | RecordedTarget | str = QDQ) -> dict[str, LayerPlan]:
    """The layer plans of ``recipe`` on ``model``, as ``target`` (or the target of that name) computes them."""
    return as_target(target).effective_plans(recipe.resolve(model))


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    progress: bool = True,
    calibration: dict[str, torch.Tensor] | None = None,
    target: Target | RecordedTarget | str = QDQ,
    *,
    consume: bool = False,
) -> QuantizedDiT:
    """Resolve ``recipe`` on ``model`` for ``target`` and quantize every covered weight: round to nearest,
    or, for ``method: gptq``, GPTQ with each linear's Hessian taken from its ``calibration`` inputs
    ``[rows, K]`` after the layer's own activation quantization (what the layer sees at inference).
    Embedding tables have no input to calibrate on and are always rounded to nearest. Under target
    ``ort`` each layer takes the plan of the kernel it is lowered to (its weights and the activation
    arithmetic of that kernel), so the reference emulates the kernel. Each layer's weight quantizer is
    :func:`ditq.calib.qlinear.choose_weight_quantizer`'s.

    ``consume=True``: nothing is quantized here; :func:`ditq.exporter.export.export` quantizes after
    tracing the float graph and leaves ``model`` without weights (the module docstring says why)."""
    target = as_target(target)
    plans = resolve_plans(model, recipe, target)
    if recipe.method == "gptq":
        missing = [n for n, p in plans.items() if p.kind == "linear" and (calibration is None or n not in calibration)]
        if missing:
            raise DitqError(f"recipe method gptq needs calibration inputs; none for layer {missing[0]!r}")
    qd = QuantizedDiT(model, recipe, plans, target=target, calibration=calibration, consume=consume)
    if not consume:
        qd.quantize_pending(progress)
    return qd

