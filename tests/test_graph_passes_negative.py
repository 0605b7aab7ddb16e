"""Cases where a pass must refuse (with the reason), and where a check must report a defect."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ditq.graphs.checks import check_activations, check_codes_equal, check_weights
from ditq.graphs.quant_activations import ActivationTarget, InsertActivationQDQPass
from ditq.graphs.quant_weights import StoreQuantizedWeightsPass, WeightTarget
from ditq.recipe import LayerPlan, LayerQuant
from tests.conftest import make_model
from tests.test_graph_passes import G, K, N, linear_model, on_grid_weight


def test_weight_that_is_a_graph_input_is_refused():
    _, qt = on_grid_weight()
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="lin")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
    )  # fmt: skip
    with pytest.raises(ValueError, match="not a constant initializer"):
        StoreQuantizedWeightsPass([WeightTarget("lin", "fc", qt)])(make_model(g))


def test_wrong_weight_shape_is_refused():
    w, qt = on_grid_weight()
    model = linear_model("MatMul", w.numpy()[:, : K // 2].copy())
    with pytest.raises(ValueError, match=r"fc .*shape"):
        StoreQuantizedWeightsPass([WeightTarget("lin", "fc", qt)])(model)


def test_scaled_gemm_is_not_a_plain_linear():
    w, qt = on_grid_weight()
    model = linear_model("Gemm", w.numpy(), np.zeros(N, np.float32), rank3=False)
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 2.0))
    with pytest.raises(ValueError, match="alpha"):
        StoreQuantizedWeightsPass([WeightTarget("lin", "fc", qt)])(model)


def test_activation_group_that_does_not_divide_is_refused():
    w, _ = on_grid_weight()
    with pytest.raises(ValueError, match="does not divide"):
        InsertActivationQDQPass([ActivationTarget("lin", "fc", 8, 24, K)])(linear_model("MatMul", w.numpy()))


def test_activation_target_must_be_a_matmul():
    w, _ = on_grid_weight()
    model = linear_model("Gemm", w.numpy(), np.zeros(N, np.float32), rank3=False)
    with pytest.raises(ValueError, match="not a MatMul"):
        InsertActivationQDQPass([ActivationTarget("lin", "fc", 8, 16, K)])(model)


def test_checks_report_wrong_block_size_type_and_codes():
    w, qt = on_grid_weight(bits=4)
    model = StoreQuantizedWeightsPass([WeightTarget("lin", "fc", qt)])(linear_model("MatMul", w.numpy())).model
    plan = {"fc": LayerPlan("fc", "linear", K, N, LayerQuant(8, None, 32, False))}  # recipe said W8 g32
    fails = check_weights(model, plan)
    assert any("UINT8" in f for f in fails) and any("block_size=16" in f for f in fails)
    _, other = on_grid_weight(seed=1)
    assert check_codes_equal(model, {"fc": plan["fc"]}, {"fc": other})  # codes differ -> reported


def test_missing_or_constant_activation_quantization_is_reported():
    w, qt = on_grid_weight()
    model = StoreQuantizedWeightsPass([WeightTarget("lin", "fc", qt)])(linear_model("MatMul", w.numpy())).model
    plan = {"fc": LayerPlan("fc", "linear", K, N, LayerQuant(4, 8, G, False))}
    assert any("not quantized" in f for f in check_activations(model, plan))
    model = InsertActivationQDQPass([ActivationTarget("lin", "fc", 8, G, K)])(model).model
    assert check_activations(model, plan) == []
    # replace the computed scale with a stored constant: the check must notice
    ql = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((5, K // G), np.float32), "frozen_scale"))
    ql.input[1] = "frozen_scale"
    assert any("stored constant" in f for f in check_activations(model, plan))
