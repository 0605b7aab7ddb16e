"""The pass infrastructure (ditq.graphs.passes): each pass checks its own postcondition, the runner runs
passes in order and reports exact counts, and a pass that does not do what it ensures is stopped with
a RuntimeError naming it (a bug of ours, never bad input). The INT2 opset/IR raise is such a pass."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ditq.calib.numerics import quantize_rtn
from ditq.graphs.lower_ort import KERNEL_NBITS, LowerToOrtKernelsPass, plan_for_ort
from ditq.graphs.opset import RaiseOpsetForInt2Pass
from ditq.graphs.passes import GraphPass, PassResult, PassSequence
from ditq.graphs.quant_activations import ActivationTarget, InsertActivationQDQPass
from ditq.graphs.quant_weights import StoreQuantizedWeightsPass, WeightTarget
from ditq.graphs.rotate import InsertRotationPass, RotationTarget
from ditq.recipe import LayerPlan, LayerQuant
from tests.conftest import make_model

K, N, G = 32, 16, 16


def two_linears(opset: int = 21) -> onnx.ModelProto:
    """x [B, 5, K] -> MatMul(x, Wa^T), MatMul(x, Wb^T): two layers reading one tensor (like to_q/to_k)."""
    g = torch.Generator().manual_seed(0)
    inits = [numpy_helper.from_array(torch.randn(K, N, generator=g).numpy(), f"w{m}") for m in "ab"]
    nodes = [helper.make_node("MatMul", ["x", f"w{m}"], [f"y{m}"], name=m) for m in "ab"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, K])],
        [helper.make_tensor_value_info(f"y{m}", TensorProto.FLOAT, ["B", 5, N]) for m in "ab"], inits,
    )  # fmt: skip
    return make_model(graph, opset)


def weight(model: onnx.ModelProto, name: str, bits: int = 4):
    w = next(t for t in model.graph.initializer if t.name == f"w{name}")
    return quantize_rtn(torch.from_numpy(numpy_helper.to_array(w).T.copy()), bits, G)  # [N, K]


def store(model, bits: int = 4) -> StoreQuantizedWeightsPass:
    return StoreQuantizedWeightsPass([WeightTarget(m, f"blk.{m}", weight(model, m, bits)) for m in "ab"])


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def test_the_sequence_runs_in_order_and_counts_exactly():
    model = two_linears()
    passes = [
        store(model),
        InsertRotationPass([RotationTarget(m, f"blk.{m}", G, K) for m in "ab"]),
        InsertActivationQDQPass([ActivationTarget(m, f"blk.{m}", 8, G, K) for m in "ab"]),
        RaiseOpsetForInt2Pass(21),
    ]
    done = PassSequence(passes)(model)
    assert [type(p).__name__ for p, _ in done.results] == [type(p).__name__ for p in passes]
    # two weights stored; one rotation and one activation subgraph shared by the two readers of x; opset as is
    assert [r.count for _, r in done.results] == [2, 1, 1, 0]
    assert [r.modified for _, r in done.results] == [True, True, True, False]
    assert (done.count(StoreQuantizedWeightsPass), done.count(InsertActivationQDQPass), done.count(LowerToOrtKernelsPass)) == (2, 1, 0)
    got = ops(done.model)
    # DequantizeLinear: 2 weights + the Hadamard constant + the shared activation; MatMul: 2 layers + the rotation
    assert (got["DequantizeLinear"], got["QuantizeLinear"], got["MatMul"]) == (4, 1, 3)
    assert [(o.domain, o.version) for o in done.model.opset_import] == [("", 21)] and done.model.ir_version == 10
    onnx.checker.check_model(done.model, full_check=True)
    assert PassSequence([])(done.model).results == ()


class _Recorder(GraphPass):
    """Records that it ran; ensures nothing."""

    def __init__(self):
        self.ran = False

    def call(self, model):
        self.ran = True
        return PassResult(model, False, 0)

    def ensures(self, model):
        return None


def _noop(base: type) -> type:
    """``base`` whose call leaves the model as it is: a pass that does not do what it ensures."""
    return type(f"Forgetful{base.__name__}", (base,), {"call": lambda self, model: PassResult(model, False, 0)})


class WrongBlockActivationQDQ(InsertActivationQDQPass):
    """Inserts the subgraph, then quantizes in blocks of 8 where its targets say 16."""

    def call(self, model):
        result = super().call(model)
        ql = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
        next(a for a in ql.attribute if a.name == "block_size").i = 8
        return result


def _lowered_plan() -> LayerPlan:
    plan = plan_for_ort(LayerPlan("blk.a", "linear", K, N, LayerQuant(4, 8, G)))
    assert plan.kernel == KERNEL_NBITS
    return plan


CASES = {  # name -> (passes to run first, the pass under test built from the model) ; then the reason's words
    "store": (lambda m: [], lambda cls, m: cls([WeightTarget("a", "blk.a", weight(m, "a"))]), StoreQuantizedWeightsPass,
              "blk.a: 0 weight DequantizeLinear nodes, expected 1"),
    "rotate": (lambda m: [], lambda cls, m: cls([RotationTarget("a", "blk.a", G, K)]), InsertRotationPass,
               "blk.a: its MatMul does not read its input rotated by hadamard(16)"),
    "activations": (lambda m: [], lambda cls, m: cls([ActivationTarget("a", "blk.a", 8, G, K)]), InsertActivationQDQPass,
                    "blk.a: its MatMul does not read its input through an activation QuantizeLinear"),
    "lower": (lambda m: [StoreQuantizedWeightsPass([WeightTarget("a", "blk.a", weight(m, "a"))])],
              lambda cls, m: cls({"blk.a": _lowered_plan()}, {"blk.a": weight(m, "a")}), LowerToOrtKernelsPass,
              "the model does not import the com.microsoft opset"),
    "opset": (lambda m: [store(m, bits=2)], lambda cls, m: cls(25), RaiseOpsetForInt2Pass,
              "the model imports opset 21, expected 25 or later"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_pass_that_skips_its_work_fails_its_postcondition_by_name(case):
    first, build, base, reason = CASES[case]
    model = two_linears()
    PassSequence([*first(model), build(base, model)])(model)  # the real pass holds its postcondition

    model = two_linears()
    broken, after = build(_noop(base), model), _Recorder()
    with pytest.raises(RuntimeError) as e:
        PassSequence([*first(model), broken, after])(model)
    assert str(e.value) == f"Forgetful{base.__name__}: postcondition failed: {reason}"
    assert not after.ran  # the runner stops at the failed pass


def test_a_pass_that_writes_the_wrong_block_fails_its_postcondition():
    model = two_linears()
    with pytest.raises(RuntimeError, match=r"^WrongBlockActivationQDQ: postcondition failed: blk.a: activation block_size 8, expected 16$"):
        WrongBlockActivationQDQ([ActivationTarget("a", "blk.a", 8, G, K)])(model)


def test_raise_opset_for_int2_sets_opset_25_and_ir_13_exactly():
    model = two_linears()
    model = store(model, bits=2)(model).model
    assert {t.data_type for t in model.graph.initializer if t.name.endswith(".qweight")} == {TensorProto.UINT2}
    result = RaiseOpsetForInt2Pass(25)(model)
    assert (result.modified, result.count) == (True, 2)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 25)] and model.ir_version == 13
    onnx.checker.check_model(model, full_check=True)
    again = RaiseOpsetForInt2Pass(25)(model)
    assert (again.modified, again.count) == (False, 0)


def test_raise_opset_without_int2_keeps_the_ir_and_other_domains():
    model = two_linears()
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    result = RaiseOpsetForInt2Pass(25)(model)
    assert (result.modified, result.count) == (True, 1)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 25), ("com.microsoft", 1)] and model.ir_version == 10
    unchanged = RaiseOpsetForInt2Pass(21)(two_linears())
    assert (unchanged.modified, unchanged.count) == (False, 0)


def test_int2_codes_below_opset_25_are_a_bug_named_by_the_pass():
    """What export's ``required_opset`` must never let happen: 2-bit codes written at opset 21."""
    model = two_linears()
    model = store(model, bits=2)(model).model
    with pytest.raises(RuntimeError, match=r"^RaiseOpsetForInt2Pass: postcondition failed: 2-bit codes \(INT2/UINT2\) in a graph at opset 21, IR 13"):
        RaiseOpsetForInt2Pass(21)(model)


def test_a_pass_must_state_its_postcondition():
    class NoEnsures(GraphPass):
        def call(self, model):
            return PassResult(model, False, 0)

    with pytest.raises(TypeError, match="ensures"):
        NoEnsures()


def test_the_real_passes_postconditions_hold_on_the_real_result():
    """Control for the broken passes above: the same sequence, unbroken, ends with every layer's weight
    behind its DequantizeLinear or kernel (the lowered layer has no weight DequantizeLinear left)."""
    model = two_linears()
    qa, qb = weight(model, "a"), weight(model, "b")
    plans = {"blk.a": _lowered_plan()}
    done = PassSequence([StoreQuantizedWeightsPass([WeightTarget("a", "blk.a", qa), WeightTarget("b", "blk.b", qb)]),
                       LowerToOrtKernelsPass(plans, {"blk.a": qa, "blk.b": qb}), RaiseOpsetForInt2Pass(21)])(model)  # fmt: skip
    got = ops(done.model)
    assert (got["MatMulNBits"], got["DequantizeLinear"], got["MatMul"]) == (1, 1, 1)
    assert [(o.domain, o.version) for o in done.model.opset_import] == [("", 21), ("com.microsoft", 1)]
    assert [r.count for _, r in done.results] == [2, 1, 0]
