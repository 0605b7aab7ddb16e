"""Target ``ort``: kernel choice, MatMulNBits packing decoded by ONNX Runtime, the kernel-emulating
reference, and validation of lowered exports (including that it catches a tampered kernel weight)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import ditq
from ditq.adapters import adapter_for
from ditq.calib.numerics import quantize_rtn, sqnr_db
from ditq.graphs.lower_ort import (
    KERNEL_INT8,
    KERNEL_NBITS,
    KERNEL_NBITS_QDQ,
    KERNEL_QDQ,
    MS_DOMAIN,
    nbits_block,
    pack_along_last,
    plan_for_ort,
    to_nbits,
    unpack_along_last,
)
from ditq.recipe import LayerPlan, LayerQuant, Recipe
from ditq.runtime.session import create_session

from .conftest import make_model

DIT_ADAPTER = adapter_for("DiTTransformer2DModel")  # the family of the models here
DIT = DIT_ADAPTER.coverage


def test_block_is_the_largest_power_of_two_dividing_the_group_up_to_128():
    assert [nbits_block(g) for g in (16, 32, 64, 128, 192, 288, 1152, 4608, 24)] == [16, 32, 64, 128, 64, 32, 128, 128, None]


def test_kernel_choice_per_layer():
    def plan(w, a, g, k=256):
        return LayerPlan("l", "linear", k, 64, LayerQuant(w, a, g))

    p = plan_for_ort(plan(8, 8, 64))  # W8A8 -> per-channel symmetric int8 weights, per-token int8 activations
    assert (p.kernel, p.quant.group_size, p.quant.symmetric, p.activation_group, p.activation_symmetric) == (KERNEL_INT8, None, True, 256, True)
    p = plan_for_ort(plan(4, 8, 192, k=1152))  # the recipe's weights, activation blocks of 64
    assert (p.kernel, p.quant.group_size, p.quant.symmetric, p.abits, p.activation_group, p.activation_symmetric) == (KERNEL_NBITS, 192, False, 8, 64, True)
    p = plan_for_ort(plan(4, None, 64))  # weight-only: the kernel quantizes its input to int8 too
    assert (p.kernel, p.abits, p.activation_group) == (KERNEL_NBITS, 8, 64)
    p = plan_for_ort(plan(4, 4, 32))  # no int4-activation kernel: the exact Q/DQ feeds an fp32 MatMulNBits
    assert (p.kernel, p.abits, p.activation_group, p.activation_symmetric) == (KERNEL_NBITS_QDQ, 4, 32, False)
    assert plan_for_ort(plan(4, 8, 8)).kernel == KERNEL_QDQ  # block 8 is below MatMulNBits' minimum
    emb = LayerPlan("e", "embedding", 64, 11, LayerQuant(4, None, 32))
    assert plan_for_ort(emb) is emb


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_along_last_roundtrip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(5, 3, 13)).astype(np.uint8)
    packed = pack_along_last(codes, bits)
    assert packed.shape == (5, 3, -(-13 * bits // 8))
    np.testing.assert_array_equal(unpack_along_last(packed, bits, 13), codes)


@pytest.mark.parametrize(
    "wbits,group,symmetric",
    [(4, 32, False), (4, 192, False), (3, 64, True), (8, 128, False), (6, 64, True), (2, 64, True)],
)
def test_matmulnbits_decodes_the_recipe_weights_exactly(wbits, group, symmetric):
    """ONNX Runtime's MatMulNBits (fp32 accuracy level 0, no activation quantization) computes with
    exactly the dequantized recipe weight: packing, unsigned offsets and repeated block scales are right."""
    k, n = 384, 48
    w = torch.randn(n, k) * 0.1
    qt = quantize_rtn(w, wbits, group, symmetric)
    block = nbits_block(group)
    nb = to_nbits(qt, block)
    inputs = ["x", "B", "S"] + (["Z"] if nb.zero_points is not None else [])
    inits = [numpy_helper.from_array(nb.b, "B"), numpy_helper.from_array(nb.scales, "S")]
    if nb.zero_points is not None:
        inits.append(numpy_helper.from_array(nb.zero_points, "Z"))
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain=MS_DOMAIN, K=k, N=n, bits=nb.bits, block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, n])], inits)  # fmt: skip
    model = make_model(graph)
    model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    x = np.random.default_rng(0).standard_normal((7, k)).astype(np.float32)
    y = create_session(model.SerializeToString()).run(None, {"x": x})[0]
    want = x.astype(np.float64) @ qt.dequantize().double().numpy().T
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5)


def _ops(path):
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _export(tiny_dit, recipe, tmp_path, name, target="ort"):
    src = tmp_path / "src"
    if not src.is_dir():
        tiny_dit.save_pretrained(src)
    loaded = ditq.load_model(str(src))  # a source validate can reload
    qdit = ditq.quantize(loaded.model, recipe, target=target)
    ditq.export(qdit, tmp_path / name, source=loaded.source)
    return qdit, tmp_path / name


def test_w8a8_lowers_every_linear_and_validates(tmp_path, tiny_dit):
    qdit, out = _export(tiny_dit, Recipe.qdit(DIT, 8, 8, 32), tmp_path, "w8a8")
    ops = _ops(out / "model.onnx")
    depth = tiny_dit.config.num_layers
    assert ops["MatMulIntegerToFloat"] == 6 * depth  # q, k, v, out, fc1, fc2 of every block
    weight_only = sum(1 for p in qdit.plans.values() if p.kind == "linear") - 6 * depth
    assert ops["MatMulNBits"] == weight_only  # adaLN, timestep MLP, proj_out_1
    assert ops["DequantizeLinear"] == depth  # only the class-embedding tables (one per block)
    assert ops["QuantizeLinear"] == 6 * depth  # one per int8 kernel: per token (axis 0, no blocks)
    qls = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node if n.op_type == "QuantizeLinear"]
    assert all({a.name: a.i for a in n.attribute} == {"axis": 0} for n in qls)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "ort" and manifest["kernels"] == {"int8_gemm": 6 * depth, "nbits": weight_only, "qdq": depth}
    report = ditq.validate(out)
    assert report.passed, report.table()
    codes = next(c for c in report.checks if c.name.startswith("activation codes"))
    assert f"in {6 * depth} activation quantizers" in codes.detail  # the int8 kernel's per-token codes, bit exact


@pytest.mark.slow
def test_w4a4_keeps_the_exact_activation_qdq(tmp_path, tiny_dit):
    qdit, out = _export(tiny_dit, Recipe.qdit(DIT, 4, 4, 32), tmp_path, "w4a4")
    ops = _ops(out / "model.onnx")
    depth = tiny_dit.config.num_layers
    assert ops["MatMulIntegerToFloat"] == 0 and ops["QuantizeLinear"] == 4 * depth  # q/k/v share one quantizer
    linears = sum(1 for p in qdit.plans.values() if p.kind == "linear")
    assert ops["MatMulNBits"] == linears and ops["MatMul"] > 0  # every linear; attention stays MatMul
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    levels = Counter(next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nodes if n.op_type == "MatMulNBits")
    assert levels == {0: 6 * depth, 4: linears - 6 * depth}  # fp32 behind the A4 Q/DQ; int8 for weight-only layers
    assert ditq.validate(out).passed


def test_the_reference_emulates_the_kernels(tmp_path, tiny_dit):
    """ORT's lowered model agrees with the kernel-emulating reference far better than with Q-DiT's own
    arithmetic: the emulation is what validation rests on, not a loose bound."""
    recipe = Recipe.qdit(DIT, 4, 8, 32)
    qdit, out = _export(tiny_dit, recipe, tmp_path, "w4a8")
    plain = ditq.quantize(tiny_dit, recipe).reference()
    emulating = qdit.reference()
    x, t, y = DIT_ADAPTER.example_inputs(dict(tiny_dit.config), batch=3, seed=5)
    o = create_session(out / "model.onnx").run(None, dict(zip(DIT_ADAPTER.input_names, (x.numpy(), t.numpy(), y.numpy()))))[0]
    with torch.no_grad():
        r_emu = emulating(x, timestep=t, class_labels=y).sample.numpy()
        r_plain = plain(x, timestep=t, class_labels=y).sample.numpy()
    assert sqnr_db(r_emu, o) >= 60.0
    assert sqnr_db(r_emu, o) >= sqnr_db(r_plain, o) + 15.0


@pytest.mark.slow
def test_validate_catches_a_tampered_kernel_scale(tmp_path, tiny_dit):
    _, out = _export(tiny_dit, Recipe.qdit(DIT, 4, 8, 32), tmp_path, "w4a8")
    proto = onnx.load(str(out / "model.onnx"))
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and "ff.net.0" in n.name)
    init = next(t for t in proto.graph.initializer if t.name == node.input[2])
    scales = numpy_helper.to_array(init).copy()
    scales[0, :] *= 1.5  # one output row's scales, every block (still consistent repeats)
    init.CopyFrom(numpy_helper.from_array(scales, init.name))
    onnx.save_model(proto, str(out / "model.onnx"))
    report = ditq.validate(out)
    assert not report.passed
    failed = [c for c in report.checks if not c.passed]
    assert any("differ from the reference" in c.detail for c in failed)


def test_io_binding_gives_the_same_outputs(tmp_path, tiny_dit):
    from ditq.runtime.session import OrtDiT

    _, out = _export(tiny_dit, Recipe.qdit(DIT, 4, 8, 32), tmp_path, "w4a8")
    x, t, y = (a.numpy() for a in DIT_ADAPTER.example_inputs(dict(tiny_dit.config), batch=2, seed=1))
    plain, bound = OrtDiT(out / "model.onnx"), OrtDiT(out / "model.onnx", io_binding=True)
    assert bound.io_binding and not plain.io_binding
    np.testing.assert_array_equal(bound(x, t, y), plain(x, t, y))
