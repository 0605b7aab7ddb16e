"""The quantized linear, defined once: what the exported graph computes for a covered layer, and the
variants of it that train or measure it.

A linear with weight ``W [N, K]``, bias ``b`` and plan ``p`` (:class:`~ditq.recipe.LayerPlan`)::

    y = Q_a(x H) dq(Q(W H))^T + b

- ``H``: the layer's block Hadamard rotation (:mod:`ditq.calib.hadamard`, block ``p.rotation``), the
  identity when the plan does not rotate: ``x H`` online, ``W H`` offline (:func:`plan_weight`).
- ``Q_a``: dynamic fake quantization of the input, per token and group of ``p.activation_group``, at
  ``p.abits`` bits, with qparams recomputed from the input at every call
  (:func:`ditq.calib.numerics.fake_quantize`); none for a weight-only layer. :func:`quantize_input` is
  this input side, the only one: the reference, QAT, GPTQ's Hessian, the activation sensitivity and
  ``ditq eval --layer-error`` all call it.
- ``Q``: the weight quantizer, one of :data:`WEIGHT_QUANTIZERS`, chosen by :func:`choose_weight_quantizer`:

  | name        | codes of ``W H``                                   | taken by                                |
  |-------------|----------------------------------------------------|-----------------------------------------|
  | ``ternary`` | absmean codes {-1, 0, 1}: ``quantize_ternary``     | ``wbits`` 1.58, whatever the method     |
  | ``gptq``    | GPTQ under the Hessian of ``Q_a(x H)``             | method gptq, a linear with calibration  |
  | ``rtn``     | min-max round to nearest: ``quantize_rtn``         | every other layer (tables too)          |

The modules: :class:`QuantLinear` (the PyTorch reference of an exported linear; given the float ``W H``
instead of ``dq(Q(W H))`` it is the activation-only layer), :class:`QuantEmbedding` (a lookup in the
dequantized table) and :class:`QATLinear` (the same forward, with straight-through gradients to the
float ``W``). :func:`swap_module` replaces a submodule by its dotted name.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.calib.gptq import HessianState, accumulate_hessian, gptq_quantize
from ditq.calib.hadamard import rotate
from ditq.calib.numerics import QuantizedTensor, fake_quantize, quantize_rtn, quantize_ternary
from ditq.recipe import LayerPlan


class _StraightThrough(torch.autograd.Function):
    """Forward: ``q`` itself (bit for bit); backward: the gradient passes to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass, with ``dq/dx = I`` in the backward pass (the straight-through estimator)."""
    return _StraightThrough.apply(x, q)


# ------------------------------------------------------------------------------------------ input side
def quantize_input(x: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """``Q_a(x H)``: ``x H`` when the plan rotates, then, when it has ``abits``, dynamic fake quantization
    per token and group of ``plan.activation_group`` (fresh qparams per call). Gradients pass through the
    rotation and straight through the quantizer."""
    if plan.rotation:
        x = rotate(x, plan.rotation)
    if plan.abits is not None:
        with torch.no_grad():
            q = fake_quantize(x, plan.abits, plan.activation_group, plan.activation_symmetric)  # (..., K)
        x = straight_through(x, q)
    return x


# ----------------------------------------------------------------------------------------- weight side
def plan_weight(weight: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """The float weight the layer's codes approximate: ``W H`` for a rotated layer, else ``W`` (autograd
    kept: QAT differentiates through it)."""
    return rotate(weight, plan.rotation) if plan.rotation else weight


# (W H, plan, calibration inputs [rows, K] or None) -> codes of W H
WeightQuantizer = Callable[[torch.Tensor, LayerPlan, "torch.Tensor | None"], QuantizedTensor]


def _rtn(w: torch.Tensor, plan: LayerPlan, inputs: torch.Tensor | None = None) -> QuantizedTensor:
    return quantize_rtn(w, plan.quant.wbits, plan.group_size, plan.quant.symmetric)


def _ternary(w: torch.Tensor, plan: LayerPlan, inputs: torch.Tensor | None = None) -> QuantizedTensor:
    return quantize_ternary(w, plan.group_size)


def _gptq(w: torch.Tensor, plan: LayerPlan, inputs: torch.Tensor | None) -> QuantizedTensor:
    """GPTQ under ``H = 2/n X^T X`` of the inputs as the layer sees them: ``X = Q_a(x H)``."""
    x = quantize_input(inputs, plan)
    h = accumulate_hessian(HessianState.zeros(x.shape[-1]), x).h
    return gptq_quantize(w, h, plan.quant.wbits, plan.group_size, plan.quant.symmetric).weight


WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {"rtn": _rtn, "gptq": _gptq, "ternary": _ternary}


def choose_weight_quantizer(plan: LayerPlan, method: str = "rtn", calibrated: bool = False) -> str:
    """The name in :data:`WEIGHT_QUANTIZERS` of the quantizer a layer takes: ternary plans their absmean
    codes (whatever the method); GPTQ for recipe method ``gptq`` on a linear with calibration inputs
    (an embedding table has no input to calibrate on); round to nearest otherwise."""
    if plan.quant.ternary:
        return "ternary"
    if method == "gptq" and calibrated and plan.kind == "linear":
        return "gptq"
    return "rtn"


def quantize_weight(
    weight: torch.Tensor, plan: LayerPlan, method: str = "rtn", inputs: torch.Tensor | None = None
) -> QuantizedTensor:
    """Integer codes of one covered layer's weight (``[N, K]`` linear weight, ``[V, D]`` table): the
    codes of ``W H`` (``W`` unrotated) by the quantizer :func:`choose_weight_quantizer` picks; ``inputs``:
    the layer's calibration inputs (GPTQ), or None."""
    w = plan_weight(weight.detach().float(), plan)
    return WEIGHT_QUANTIZERS[choose_weight_quantizer(plan, method, inputs is not None)](w, plan, inputs)


# --------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """``y = Q_a(x H) weight^T + b``: the reference of an exported linear (``weight = dq(Q(W H))``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: LayerPlan):
        super().__init__()
        self.register_buffer("weight", weight.detach().float())  # (N, K): exactly the graph's DQ output
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_input(x, self.plan), self.weight, self.bias)

    def extra_repr(self) -> str:
        p = self.plan
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, abits={p.abits}, group={p.activation_group}"


class QuantEmbedding(nn.Module):
    """An embedding table stored as integer codes: a lookup in ``weight = dq(Q(table))``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().float())  # (V, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class QATLinear(nn.Linear):
    """``nn.Linear`` computing the :class:`QuantLinear` forward of its plan from its float parameters,
    with straight-through gradients through both quantizers to the float ``W``."""

    def __init__(self, linear: nn.Linear, plan: LayerPlan):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight = linear.weight
        self.bias = linear.bias
        self.plan = plan

    def quantized_weight(self) -> torch.Tensor:
        """``dq(Q(W H))`` in the forward pass, ``d/dW`` of ``W H`` in the backward pass."""
        w = plan_weight(self.weight, self.plan)
        with torch.no_grad():
            deq = WEIGHT_QUANTIZERS[choose_weight_quantizer(self.plan)](w, self.plan, None).dequantize().to(w.dtype)
        return straight_through(w, deq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_input(x, self.plan), self.quantized_weight(), self.bias)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of the submodule ``name`` (dotted, e.g. ``transformer_blocks.0.attn1.to_q``)
    of ``model``; returns the module it replaces."""
    parent, _, attr = name.rpartition(".")
    if not attr:
        raise ValueError(f"no submodule named {name!r}")
    owner = model.get_submodule(parent)  # "" is the model itself
    old = owner.get_submodule(attr)  # raises AttributeError when ``name`` is no submodule
    setattr(owner, attr, new)
    return old
