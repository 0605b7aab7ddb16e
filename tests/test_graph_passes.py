"""Each graph pass on a tiny inline model: rewrite counts, onnx checker, ORT before vs after."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ditq.calib.numerics import fake_quantize, quantize_rtn
from ditq.graphs.checks import check_activations, check_codes_equal, check_weights
from ditq.graphs.quant_activations import ActivationTarget, InsertActivationQDQPass
from ditq.graphs.quant_weights import StoreQuantizedWeightsPass, WeightTarget
from ditq.recipe import LayerPlan, LayerQuant
from tests.conftest import make_model, run_ort

K, N, G = 64, 24, 16


def on_grid_weight(bits=4, symmetric=False, seed=0):
    """A weight that lies exactly on its own quantization grid: storing it as codes is lossless."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    qt = quantize_rtn(w, bits, G, symmetric)
    return qt.dequantize(), qt


def linear_model(op: str, w: np.ndarray, bias: np.ndarray | None = None, rank3=True) -> onnx.ModelProto:
    """x -> MatMul(x, W^T) (token linear) or Gemm(x, W, b, transB=1) (2-D linear)."""
    shape = ["B", 5, K] if rank3 else ["B", K]
    out_shape = ["B", 5, N] if rank3 else ["B", N]
    if op == "MatMul":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="lin")]
        inits = [onnx.numpy_helper.from_array(np.ascontiguousarray(w.T), "w")]
    else:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="lin", transB=1)]
        inits = [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(bias, "b")]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits,
    )  # fmt: skip
    return make_model(g)


def ops(model):
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (6, True), (3, False)])
def test_store_weights_matmul_is_exact_on_grid(bits, symmetric):
    w, qt = on_grid_weight(bits, symmetric)
    model = linear_model("MatMul", w.numpy())
    x = np.random.default_rng(0).standard_normal((2, 5, K)).astype(np.float32)
    (before,) = run_ort(model, {"x": x})
    res = StoreQuantizedWeightsPass([WeightTarget("lin", "blk.fc", qt)])(model)
    after_model = res.model
    assert res.count == 1 and ops(after_model) == Counter({"DequantizeLinear": 1, "MatMul": 1})
    assert {t.name for t in after_model.graph.initializer} == {"blk.fc.qweight", "blk.fc.qscale"} | (
        set() if symmetric else {"blk.fc.qzero"}
    )  # the float weight is gone
    onnx.checker.check_model(after_model, full_check=True)
    (after,) = run_ort(after_model, {"x": x})
    np.testing.assert_array_equal(after, before)
    plan = {"blk.fc": LayerPlan("blk.fc", "linear", K, N, LayerQuant(bits, None, G, symmetric))}
    assert check_weights(after_model, plan) == []
    assert check_codes_equal(after_model, plan, {"blk.fc": qt}) == []


def test_store_weights_gemm_becomes_matmul_plus_bias():
    w, qt = on_grid_weight()
    b = np.arange(N, dtype=np.float32)
    model = linear_model("Gemm", w.numpy(), b, rank3=False)
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    (before,) = run_ort(model, {"x": x})
    out = StoreQuantizedWeightsPass([WeightTarget("lin", "adaln", qt)])(model).model
    assert ops(out) == Counter({"DequantizeLinear": 1, "MatMul": 1, "Add": 1})
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": G}  # [K, N] blocked along K: MatMulNBits-fusable layout
    onnx.checker.check_model(out, full_check=True)
    (after,) = run_ort(out, {"x": x})
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)  # Gemm vs MatMul+Add: fp32 reassociation


def test_store_weights_embedding_table():
    table, qt = on_grid_weight()  # [V=N, D=K]
    g = helper.make_graph(
        [helper.make_node("Gather", ["t", "ids"], ["y"], name="emb")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", K])],
        [onnx.numpy_helper.from_array(table.numpy(), "t")],
    )  # fmt: skip
    model = make_model(g)
    ids = np.array([0, 5, N - 1], np.int64)
    (before,) = run_ort(model, {"ids": ids})
    out = StoreQuantizedWeightsPass([WeightTarget("emb", "cls", qt)])(model).model
    assert ops(out) == Counter({"DequantizeLinear": 1, "Gather": 1})
    onnx.checker.check_model(out, full_check=True)
    (after,) = run_ort(out, {"ids": ids})
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, False), (4, True), (6, False), (2, False)])
@pytest.mark.parametrize("group", [16, K])
def test_activation_qdq_matches_torch_fake_quant_exactly(bits, symmetric, group):
    w, qt = on_grid_weight()
    model = StoreQuantizedWeightsPass([WeightTarget("lin", "fc", qt)])(linear_model("MatMul", w.numpy())).model
    x = (np.random.default_rng(2).standard_normal((2, 5, K)) * 4).astype(np.float32)
    (before,) = run_ort(model, {"x": x})
    res = InsertActivationQDQPass([ActivationTarget("lin", "fc", bits, group, K, symmetric)])(model)
    out = res.model
    c = ops(out)
    assert res.count == 1 and c["QuantizeLinear"] == 1 and c["DequantizeLinear"] == 2
    assert c["ReduceMin"] == 1 and c["ReduceMax"] == 1
    assert c["Clip"] == (1 if (bits < 8 or symmetric) else 0)
    onnx.checker.check_model(out, full_check=True)
    (after,) = run_ort(out, {"x": x})
    want = torch.nn.functional.linear(fake_quantize(torch.from_numpy(x), bits, group, symmetric), w).numpy()
    np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-5)  # same codes; only the fp32 matmul order differs
    # before vs after: each input moves by at most half a step of its group, so |dy| <= sum |w| * step / 2
    xg = torch.from_numpy(x).reshape(2, 5, K // group, group)
    lo, hi = xg.amin(-1).clamp(max=0), xg.amax(-1).clamp(min=0)
    levels = 2**bits - 1 if not symmetric else 2 ** (bits - 1) - 1
    step = ((hi - lo) if not symmetric else torch.maximum(-lo, hi)) / levels
    step_per_channel = step.repeat_interleave(group, dim=-1)  # (2, 5, K)
    bound = (step_per_channel / 2) @ w.abs().T.double().float() + 1e-4
    assert np.all(np.abs(after - before) <= bound.numpy())
    plan = {"fc": LayerPlan("fc", "linear", K, N, LayerQuant(4, bits, group, symmetric))}
    assert check_activations(out, plan) == []


def test_shared_input_gets_one_subgraph():
    """to_q/to_k/to_v read the same tensor: with the same configuration they share one quantizer."""
    w, qt = on_grid_weight()
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"m{i}") for i in range(3)]
    inits = [onnx.numpy_helper.from_array(np.ascontiguousarray(w.numpy().T), f"w{i}") for i in range(3)]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, K])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["B", 5, N]) for i in range(3)], inits,
    )  # fmt: skip
    model = make_model(g)
    model = StoreQuantizedWeightsPass([WeightTarget(f"m{i}", f"q{i}", qt) for i in range(3)])(model).model
    targets = [ActivationTarget(f"m{i}", f"q{i}", 8, 16, K) for i in range(3)]
    targets[2] = ActivationTarget("m2", "q2", 8, 32, K)  # a different group size gets its own
    res = InsertActivationQDQPass(targets)(model)
    assert res.count == 2 and ops(res.model)["QuantizeLinear"] == 2
    onnx.checker.check_model(res.model, full_check=True)
    x = np.random.default_rng(3).standard_normal((1, 5, K)).astype(np.float32)
    y0, y1, y2 = run_ort(res.model, {"x": x})
    np.testing.assert_array_equal(y0, y1)
    assert not np.array_equal(y0, y2)


def test_inserted_nodes_are_named_after_the_module():
    w, qt = on_grid_weight()
    model = StoreQuantizedWeightsPass([WeightTarget("lin", "blocks.0.fc1", qt)])(linear_model("MatMul", w.numpy())).model
    model = InsertActivationQDQPass([ActivationTarget("lin", "blocks.0.fc1", 8, 16, K)])(model).model
    inserted = [n.name for n in model.graph.node if n.name != "lin"]
    assert inserted and all(n.startswith("blocks.0.fc1/") for n in inserted)
