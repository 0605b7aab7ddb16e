"""The quantized linear is one definition: the reference layer, the QAT layer and the activation
sensitivity compute the same thing bit for bit; QAT's gradients are the straight-through ones (checked
against a backward pass written out here); the weight quantizer is chosen in one place; submodules are
swapped by name."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn

from ditq.calib.hadamard import rotate as hadamard_rotate
from ditq.calib.numerics import QuantizedTensor
from ditq.calib.qlinear import (
    WEIGHT_QUANTIZERS,
    QATLinear,
    QuantLinear,
    choose_weight_quantizer,
    quantize_input,
    quantize_weight,
    swap_module,
)
from ditq.calib.robuq import activation_plan, activation_sensitivity
from ditq.exporter.reference import QuantizedDiT
from ditq.recipe import TERNARY, LayerPlan, LayerQuant, Recipe

K, N = 192, 48  # rotation block 64: three Hadamard blocks per row


def _plan(wbits, rotate: bool, kind: str = "linear") -> LayerPlan:
    ternary = wbits == TERNARY
    quant = LayerQuant(wbits=wbits, abits=4, group_size=None if ternary else 32, symmetric=ternary, rotate=rotate)
    return LayerPlan("layer", kind, K, N, quant)


def _linear_and_input(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
        lin.bias.copy_(torch.randn(N, generator=g))
    x = torch.randn(2, 5, K, generator=g)
    x[..., torch.randperm(K, generator=g)[:3]] *= 20.0  # outlier channels, what the rotation spreads out
    return lin, x


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("wbits", [4, TERNARY], ids=["w4", "ternary"])
def test_reference_and_qat_linears_compute_the_same_bits(wbits, rotate):
    plan = _plan(wbits, rotate)
    assert bool(plan.rotation) == rotate
    lin, x = _linear_and_input()
    reference = QuantLinear(quantize_weight(lin.weight, plan).dequantize(), lin.bias, plan)
    qat = QATLinear(lin, plan).eval()
    with torch.no_grad():
        want = reference(x)
        assert torch.equal(qat(x), want)
    assert torch.equal(qat(x), want)  # with autograd on too: the straight-through forward is exactly q
    assert not torch.equal(want, lin(x))  # and it is not the float layer


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
def test_sensitivity_measures_the_reference_layer_with_float_weights(tiny_dit, rotate):
    """The sensitivity of a unit at b bits is exactly the relative output error of the reference model
    whose unit quantizes its input to b bits per token (rotated when asked) and keeps float weights
    ``W H``: a QuantizedTensor of group size 1 (code sign(w), scale |w|) dequantizes to ``W H`` itself."""
    unit, bits = "transformer_blocks.1.ff.net.2", 2  # K = 256: rotation block 128
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(4, 4, 8, 8, generator=g), torch.tensor([10, 300, 600, 999]), torch.tensor([0, 3, 7, 10]))
    got = activation_sensitivity(tiny_dit, [bits], rotate=rotate, inputs=inputs)[unit][bits]

    lin = tiny_dit.get_submodule(unit)
    plan = activation_plan(unit, lin, bits, rotate)
    w = lin.weight.detach().float()
    w = hadamard_rotate(w, plan.rotation) if rotate else w
    exact = QuantizedTensor(torch.sign(w).to(torch.int16), w.abs(), torch.zeros_like(w, dtype=torch.int16), 2, 1, True)
    assert torch.equal(exact.dequantize(), w)
    reference = QuantizedDiT(tiny_dit, Recipe(), {unit: plan}, {unit: exact}).reference()
    x, t, y = inputs
    with torch.no_grad():
        ref, out = tiny_dit(x, timestep=t, class_labels=y).sample, reference(x, timestep=t, class_labels=y).sample
    want = float(((out - ref).double() ** 2).sum()) / float((ref.double() ** 2).sum())
    assert got == want
    assert 0 < got < 1
    assert isinstance(tiny_dit.get_submodule(unit), nn.Linear)  # the float layer is back in place


@pytest.mark.parametrize("wbits", [4, TERNARY], ids=["w4", "ternary"])
def test_qat_gradients_are_the_straight_through_ones(wbits):
    """``y = Q_a(x H) Wq^T + b`` with both quantizers treated as the identity backward: for an upstream
    gradient ``G``, ``dx = (G Wq) H^T``, ``dW = (G^T Q_a(x H)) H^T``, ``db = sum G`` (``H`` built here)."""
    plan = _plan(wbits, rotate=True)
    lin, x = _linear_and_input(1)
    x.requires_grad_(True)
    qat = QATLinear(lin, plan)
    y = qat(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * upstream).sum().backward()

    b = plan.rotation
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while len(sylvester) < b:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)])
    h = torch.block_diag(*[sylvester / b**0.5] * (K // b))  # (K, K)
    with torch.no_grad():
        xq = quantize_input(x, plan).double().reshape(-1, K)  # the forward's values (equal to the reference's)
        wq = quantize_weight(lin.weight, plan).dequantize().double()
    gr = upstream.double().reshape(-1, N)
    want_dx = (gr @ wq @ h.T).reshape(x.shape)
    want_dw = gr.T @ xq @ h.T
    # float32 autograd against float64 here: sums of at most 192 products of O(1) terms, so the float32
    # round-off is below 1e-5 of the largest entry; a missing rotation or quantizer gradient is O(1) off
    for got, want in ((x.grad, want_dx), (lin.weight.grad, want_dw), (lin.bias.grad, gr.sum(0))):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert qat.weight is lin.weight  # the trained parameter is the float weight itself


def test_the_weight_quantizer_is_chosen_in_one_place():
    assert set(WEIGHT_QUANTIZERS) == {"rtn", "gptq", "ternary"}
    w4, tern, table = _plan(4, False), _plan(TERNARY, False), _plan(4, False, kind="embedding")
    assert choose_weight_quantizer(w4) == "rtn"
    assert choose_weight_quantizer(w4, "gptq", calibrated=True) == "gptq"
    assert choose_weight_quantizer(w4, "gptq", calibrated=False) == "rtn"  # nothing to calibrate on
    assert choose_weight_quantizer(w4, "rtn", calibrated=True) == "rtn"
    assert choose_weight_quantizer(tern, "gptq", calibrated=True) == "ternary"  # absmean codes always
    assert choose_weight_quantizer(table, "gptq", calibrated=True) == "rtn"  # a table has no input
    # and quantize_weight follows it: GPTQ codes differ from RTN's on correlated inputs
    lin, x = _linear_and_input()
    x = x.reshape(-1, K) @ torch.randn(K, K, generator=torch.Generator().manual_seed(3))
    rtn, gptq = quantize_weight(lin.weight, w4), quantize_weight(lin.weight, w4, "gptq", x)
    assert torch.equal(quantize_weight(lin.weight, w4, "rtn", x).codes, rtn.codes)
    assert not torch.equal(gptq.codes, rtn.codes)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"to_q": nn.Linear(4, 4), "to_k": nn.Linear(4, 4)})
        self.ff = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))


def test_swap_module_replaces_exactly_the_named_module():
    model = nn.Sequential()
    model.add_module("blocks", nn.ModuleList([_Block(), _Block()]))
    before = dict(model.named_modules())
    new = nn.Identity()
    old = swap_module(model, "blocks.1.attn.to_q", new)
    assert old is before["blocks.1.attn.to_q"]
    after = dict(model.named_modules())
    assert after["blocks.1.attn.to_q"] is new
    assert {n for n in before if before[n] is not after.get(n)} == {"blocks.1.attn.to_q"}
    assert after["blocks.0.attn.to_q"] is before["blocks.0.attn.to_q"]  # the same name in another block
    # an index inside a Sequential, and a top-level name
    swap_module(model, "blocks.0.ff.2", nn.Identity())
    assert isinstance(model.blocks[0].ff[2], nn.Identity) and isinstance(model.blocks[0].ff[0], nn.Linear)
    swap_module(model, "blocks", nn.Identity())
    assert isinstance(model.blocks, nn.Identity)


@pytest.mark.parametrize("name", ["blocks.0.attn.to_v", "blocks.7.ff", "", "blocks.0.attn.to_q.weight"])
def test_swap_module_refuses_a_name_that_is_no_submodule(name):
    model = nn.Sequential()
    model.add_module("blocks", nn.ModuleList([_Block()]))
    before = dict(model.named_modules())
    with pytest.raises((AttributeError, IndexError, ValueError)):
        swap_module(model, name, nn.Identity())
    assert dict(model.named_modules()) == before


@pytest.mark.parametrize(
    "module,name",
    [("ditq.exporter.reference", "quantize_input"), ("ditq.exporter.reference", "plan_input"),
     ("ditq.exporter.reference", "gptq_weight"), ("ditq.exporter.reference", "plan_weight"),
     ("ditq.calib.qat", "_ste"), ("ditq.calib.robuq", "hadamard"), ("ditq.calib.robuq", "rotate"),
     ("ditq.calib.robuq", "quantize_ternary"), ("ditq.calib.robuq", "sensitivity_table")],
)  # fmt: skip
def test_the_quantized_linear_has_no_second_copy(module, name):
    assert not hasattr(importlib.import_module(module), name)


def test_no_unused_noise_helper():
    from ditq.schedule import NoiseSchedule

    assert not hasattr(NoiseSchedule, "add_noise")
