"""The PyTorch reference: modules computing exactly what the exported ONNX graph computes.

``QuantLinear``: ``y = dq(q_a(x)) @ dq(W_codes)^T + b`` where ``dq(W_codes)`` is the dequantized integer
weight and ``q_a`` is dynamic per-token, per-group activation quantization recomputed from the input at
every call (Q-DiT's sample-wise dynamic quantization). ``QuantEmbedding``: a lookup in the dequantized
table. The numerics are :mod:`ditq.calib.numerics`, the same functions whose codes ONNX Runtime
reproduces bit for bit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ditq.calib.numerics import QuantizedTensor, fake_quantize, quantize_rtn
from ditq.calib.robuq import quantize_ternary, rotate
from ditq.recipe import LayerPlan, Recipe


def quantize_input(
    x: torch.Tensor, rotation: int | None, abits: int | None, group_size: int, symmetric: bool
) -> torch.Tensor:
    """The input side of a covered linear, what its stored weight ``dq(Q(W H))`` (``dq(Q(W))`` unrotated)
    multiplies: ``x H`` when the layer is rotated (Hadamard blocks of ``rotation``), then, with ``abits``,
    dynamic fake quantization per token and group of ``group_size`` (fresh qparams per call)."""
    if rotation:
        x = rotate(x, rotation)
    if abits is not None:
        x = fake_quantize(x, abits, group_size, symmetric)  # (..., K)
    return x


def plan_input(x: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """:func:`quantize_input` as ``plan`` configures the layer."""
    return quantize_input(x, plan.rotation, plan.abits, plan.activation_group, plan.activation_symmetric)


class QuantLinear(nn.Module):
    """A linear with integer-code weights and optional dynamic per-group input quantization."""

    def __init__(
        self,
        qweight: QuantizedTensor,
        bias: torch.Tensor | None,
        abits: int | None,
        symmetric: bool,
        act_group: int | None = None,
        rotation: int | None = None,
    ):
        super().__init__()
        self.register_buffer("weight", qweight.dequantize())  # (N, K) float32, exactly the graph's DQ output
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.abits, self.symmetric = abits, symmetric
        self.group_size = act_group or qweight.group_size  # activation group (a kernel may differ from the weight's)
        self.rotation = rotation  # Hadamard block: the stored weight is W H, the input becomes x H

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_input(x, self.rotation, self.abits, self.group_size, self.symmetric)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, abits={self.abits}, group={self.group_size}"


class QuantEmbedding(nn.Module):
    """An embedding table stored as integer codes (grouped along the embedding width)."""

    def __init__(self, qweight: QuantizedTensor):
        super().__init__()
        self.register_buffer("weight", qweight.dequantize())  # (V, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def plan_weight(module: nn.Module, plan: LayerPlan) -> torch.Tensor:
    """The float weight the layer's codes approximate: ``W H`` for a rotated layer, else ``W``."""
    w = module.weight.detach().float()
    return rotate(w, plan.rotation) if plan.rotation else w


def quantize_weight(module: nn.Module, plan: LayerPlan) -> QuantizedTensor:
    """RTN (or ternary) codes of one covered module's weight (``[N, K]`` linear weight, ``[V, D]`` table)."""
    q = plan.quant
    if q.ternary:
        return quantize_ternary(plan_weight(module, plan), plan.group_size)
    return quantize_rtn(plan_weight(module, plan), q.wbits, plan.group_size, q.symmetric)


@dataclass
class QuantizedDiT:
    """A float DiT, its resolved recipe and the integer weights of every covered layer."""

    model: nn.Module
    recipe: Recipe
    plans: dict[str, LayerPlan]
    weights: dict[str, QuantizedTensor] = field(default_factory=dict)
    target: str = "qdq"  # "ort": plans are the kernel-effective ones (ditq.graphs.lower_ort.plan_for_ort)

    def modules(self) -> Iterator[tuple[str, nn.Module, LayerPlan]]:
        named = dict(self.model.named_modules())
        for name, plan in self.plans.items():
            yield name, named[name], plan

    def reference(self, inplace: bool = False) -> nn.Module:
        """The reference model; ``inplace=True`` swaps the modules of ``self.model`` (saves a copy)."""
        model = self.model if inplace else copy.deepcopy(self.model)
        named = dict(model.named_modules())
        for name, plan in self.plans.items():
            old = named[name]
            if plan.kind == "linear":
                new = QuantLinear(
                    self.weights[name], old.bias, plan.abits, plan.activation_symmetric, plan.activation_group,
                    plan.rotation,
                )  # fmt: skip
            else:
                new = QuantEmbedding(self.weights[name])
            parent_name, _, attr = name.rpartition(".")
            setattr(named[parent_name] if parent_name else model, attr, new)
        return model.eval()


def resolve_plans(model: nn.Module, recipe: Recipe, target: str = "qdq") -> dict[str, LayerPlan]:
    """The layer plans of ``recipe`` on ``model``, as target ``target`` computes them."""
    from ditq.errors import DitqError
    from ditq.fileformat import TARGETS

    if target not in TARGETS:
        raise DitqError(f"unknown target {target!r}; choose from {list(TARGETS)}")
    plans = recipe.resolve(model)
    if target == "ort":
        from ditq.graphs.lower_ort import lower_plans

        plans = lower_plans(plans)
    return plans


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    progress: bool = True,
    calibration: dict[str, torch.Tensor] | None = None,
    target: str = "qdq",
) -> QuantizedDiT:
    """Resolve ``recipe`` on ``model`` for ``target`` and quantize every covered weight: round to nearest,
    or, for ``method: gptq``, GPTQ with each linear's Hessian taken from its ``calibration`` inputs
    ``[rows, K]`` after the layer's own activation quantization (what the layer sees at inference).
    Embedding tables have no input to calibrate on and are always rounded to nearest. Under target
    ``ort`` each layer takes the plan of the kernel it is lowered to (its weights and the activation
    arithmetic of that kernel), so the reference emulates the kernel."""
    from ditq.errors import DitqError

    plans = resolve_plans(model, recipe, target)
    qd = QuantizedDiT(model, recipe, plans, target=target)
    gptq = recipe.method == "gptq"
    if gptq:
        missing = [n for n, p in plans.items() if p.kind == "linear" and (calibration is None or n not in calibration)]
        if missing:
            raise DitqError(f"recipe method gptq needs calibration inputs; none for layer {missing[0]!r}")
    desc = "GPTQ" if gptq else "quantize weights"
    for name, module, plan in tqdm(list(qd.modules()), desc=desc, unit="layer", disable=not progress):
        if gptq and plan.kind == "linear" and not plan.quant.ternary:  # ternary codes: absmean rounding
            qd.weights[name] = gptq_weight(module, plan, calibration[name])
        else:
            qd.weights[name] = quantize_weight(module, plan)
    return qd


def gptq_weight(module: nn.Module, plan: LayerPlan, x: torch.Tensor) -> QuantizedTensor:
    """GPTQ codes of one linear from its calibration inputs, activation-quantized as the recipe says."""
    from ditq.calib.gptq import HessianState, accumulate_hessian, gptq_quantize

    x = plan_input(x, plan)
    h = accumulate_hessian(HessianState.zeros(x.shape[-1]), x).h
    return gptq_quantize(plan_weight(module, plan), h, plan.quant.wbits, plan.group_size, plan.quant.symmetric).weight
