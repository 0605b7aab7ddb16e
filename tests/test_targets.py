"""Targets as objects (ditq.graphs.targets) and the layer plans a model records (``ditq.plans``): the
registry of target names, each target's kernel options and passes, the record written by export equal
to the plans used, and ``ditq validate`` checking a model against what it records rather than against
what this ditq would choose today; a missing, garbled or ill-typed record is one line, exit 2."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import onnx
import pytest
import torch

import ditq
from ditq.calib.numerics import quantize_rtn
from ditq.errors import DitqError
from ditq.fileformat import TARGETS
from ditq.graphs.lower_ort import KERNEL_INT8, KERNEL_NBITS, KERNEL_NBITS_QDQ, KERNEL_QDQ, kernel_options
from ditq.graphs.lower_ort import LowerToOrtKernelsPass
from ditq.graphs.plan_record import plans_from_json, plans_to_json
from ditq.graphs.quant_activations import InsertActivationQDQPass
from ditq.graphs.quant_weights import StoreQuantizedWeightsPass
from ditq.graphs.rotate import InsertRotationPass
from ditq.graphs.targets import ORT, QDQ, OrtTarget, Target, target_named
from ditq.recipe import TERNARY, LayerPlan, LayerQuant, Recipe
from ditq.workflows.validate import PLANS_CHECK
from tests.conftest import assert_one_line_refusal, run

G = 16
KEY = "ditq.plans"


def plan(wbits, abits, group, k=64, n=64, kind="linear", symmetric=False, rotate=False) -> LayerPlan:
    return LayerPlan("blk.fc", kind, k, n, LayerQuant(wbits, abits, group, symmetric, rotate))


# ------------------------------------------------------------------------------------------ registry
def test_the_registry_holds_the_file_format_names():
    assert tuple(t.name for t in (QDQ, ORT)) == TARGETS == ("qdq", "ort")
    assert target_named("qdq") is QDQ and target_named("ort") is ORT
    assert type(QDQ) is Target and type(ORT) is OrtTarget


@pytest.mark.parametrize("name", ["QDQ", "", "cuda", "x" * 100_000, None, 7])
def test_an_unknown_target_name_is_one_line_listing_the_choices(name):
    with pytest.raises(DitqError) as e:
        target_named(name)
    msg = str(e.value)
    assert msg.startswith("target must be one of qdq, ort, got ") and "\n" not in msg and len(msg) < 200


# ------------------------------------------------------------------------------------------ plans
def test_kernel_options_of_each_kind_of_layer():
    w8a8 = plan(8, 8, G)
    assert set(ORT.kernel_options(w8a8)) == {KERNEL_QDQ, KERNEL_INT8, KERNEL_NBITS}
    int8 = ORT.kernel_options(w8a8)[KERNEL_INT8]  # per-channel symmetric weights, per-token symmetric activations
    assert (int8.quant.group_size, int8.quant.symmetric, int8.act_group, int8.act_symmetric) == (None, True, 64, True)
    assert set(ORT.kernel_options(plan(4, 4, 32))) == {KERNEL_QDQ, KERNEL_NBITS_QDQ}  # A4: only exact Q/DQ activations
    assert set(ORT.kernel_options(plan(4, 8, 8))) == {KERNEL_QDQ}  # block 8 is below MatMulNBits' minimum of 16
    assert set(ORT.kernel_options(plan(8, 8, G, rotate=True))) == {KERNEL_QDQ, KERNEL_NBITS}  # int8 kernel: no rotation
    emb = plan(4, None, G, kind="embedding")
    assert ORT.kernel_options(emb) == {KERNEL_QDQ: emb} and ORT.effective_plan(emb) is emb
    # the choice: the fastest option; qdq runs every layer as the recipe says
    assert ORT.effective_plan(w8a8).kernel == KERNEL_INT8 and ORT.effective_plan(plan(4, 8, G)).kernel == KERNEL_NBITS
    assert QDQ.kernel_options(w8a8) == {KERNEL_QDQ: w8a8} and QDQ.effective_plan(w8a8) is w8a8


def test_plan_problems_name_the_layer_and_accept_every_kernel_option():
    base = {"blk.fc": plan(8, 8, G)}
    for kernel, option in kernel_options(base["blk.fc"]).items():
        assert ORT.plan_problems(base, {"blk.fc": option}) == [], kernel
    nbits = {"blk.fc": kernel_options(base["blk.fc"])[KERNEL_NBITS]}
    assert QDQ.plan_problems(base, nbits)[0].startswith("'blk.fc': recorded linear 64->64 W8A8g16")
    assert ORT.plan_problems(base, {"blk.fc": plan(4, 8, G)})  # other weight bits than the recipe's
    assert ORT.plan_problems(base, {}) == ["'blk.fc': covered by the recipe, not recorded"]
    assert ORT.plan_problems({}, base) == ["'blk.fc': recorded, but the recipe does not cover it"]
    recorded = ORT.recorded(nbits)
    assert recorded.effective_plans(base) == nbits and recorded.name == "ort" and recorded.base is ORT
    with pytest.raises(DitqError, match="not the recipe's under target qdq: 'blk.fc'"):
        QDQ.recorded(nbits).effective_plans(base)


def test_passes_of_each_target():
    plans, bound = {"blk.fc": plan(4, 8, G)}, {"blk.fc": "mm"}
    weights = {"blk.fc": quantize_rtn(torch.randn(64, 64), 4, G)}
    qdq = QDQ.passes(plans, weights, bound)
    assert [type(p) for p in qdq] == [StoreQuantizedWeightsPass, InsertRotationPass, InsertActivationQDQPass]
    ort = ORT.passes(ORT.effective_plans(plans), weights, bound)
    assert [type(p) for p in ort] == [StoreQuantizedWeightsPass, InsertRotationPass, InsertActivationQDQPass, LowerToOrtKernelsPass]
    # the lowered layer's activation is the kernel's: no in-graph activation Q/DQ for it
    assert (len(qdq[2].targets), len(ort[2].targets), len(ort[3].plans)) == (1, 0, 1)


def test_the_plan_record_reads_back_what_it_wrote():
    plans = {
        "a": plan(4, 8, G),
        "b": ORT.effective_plan(plan(8, 8, G)),
        "c": ORT.effective_plan(plan(TERNARY, 4, None, symmetric=True, rotate=True)),
        "d": plan(6, None, None, kind="embedding", k=64, n=11),
    }
    plans = {k: replace(p, name=k) for k, p in plans.items()}  # a plan is named by its layer
    text = plans_to_json(plans)
    assert plans_from_json(text, "x") == plans
    assert json.loads(text)["c"] == {"kind": "linear", "in_features": 64, "out_features": 64, "wbits": 1.58, "abits": 4,
                                     "group_size": None, "symmetric": True, "rotate": True, "kernel": "nbits_qdq",
                                     "act_group": None, "act_symmetric": None}  # fmt: skip


# ------------------------------------------------------------------------------------------ exported files
def alternative_policy(p: LayerPlan) -> LayerPlan:
    """Another ort policy: adaLN kept as Q/DQ, everything else on MatMulNBits where it fits (never int8)."""
    options = kernel_options(p)
    if p.name.endswith("norm1.linear"):
        return options[KERNEL_QDQ]
    return options.get(KERNEL_NBITS, options[KERNEL_QDQ])


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_validate_follows_the_plans_the_file_records(tiny_source, tmp_path, monkeypatch, capsys):
    """A W8A8 ``ort`` model built by another kernel policy: this ditq would put every linear on the int8
    kernel, the file has MatMulNBits and Q/DQ layers. Validation rebuilds the reference from the file's
    record and passes (recomputing today's plans would look for 20 MatMulIntegerToFloat and fail)."""
    loaded = ditq.load_model(str(tiny_source))
    recipe = Recipe(LayerQuant(8, 8, G))
    monkeypatch.setattr("ditq.graphs.targets.plan_for_ort", alternative_policy)
    qdit = ditq.quantize(loaded.model, recipe, target="ort")
    ditq.export(qdit, tmp_path / "m", source=loaded.source)
    monkeypatch.undo()

    today = ORT.effective_plans(recipe.resolve(loaded.model))
    assert sum(p.kernel == KERNEL_INT8 for p in today.values()) == 20  # every linear of the tiny DiT
    model = onnx.load(str(tmp_path / "m" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert (ops.count("MatMulNBits"), ops.count("MatMulIntegerToFloat"), ops.count("QuantizeLinear")) == (18, 0, 2)

    # the record: exactly the plans the graph was built from, field for field
    rec = json.loads(metadata(tmp_path / "m" / "model.onnx")[KEY])
    assert list(rec) == list(qdit.plans)
    for name, p in qdit.plans.items():
        q = p.quant
        assert rec[name] == {"kind": p.kind, "in_features": p.in_features, "out_features": p.out_features, "wbits": q.wbits,
                             "abits": q.abits, "group_size": q.group_size, "symmetric": q.symmetric, "rotate": q.rotate,
                             "kernel": p.kernel, "act_group": p.act_group, "act_symmetric": p.act_symmetric}  # fmt: skip
    blk = "transformer_blocks.0."
    assert rec[blk + "attn1.to_q"] == {"kind": "linear", "in_features": 64, "out_features": 64, "wbits": 8, "abits": 8,
                                       "group_size": 16, "symmetric": False, "rotate": False, "kernel": "nbits",
                                       "act_group": 16, "act_symmetric": True}  # fmt: skip
    assert rec[blk + "norm1.linear"] == {"kind": "linear", "in_features": 64, "out_features": 384, "wbits": 8, "abits": 8,
                                         "group_size": 16, "symmetric": False, "rotate": False, "kernel": "qdq",
                                         "act_group": None, "act_symmetric": None}  # fmt: skip

    code, out, err = run(["validate", str(tmp_path / "m"), "--json", str(tmp_path / "v.json")], capsys)
    assert code == 0, out + err
    report = json.loads((tmp_path / "v.json").read_text())
    codes = next(c for c in report["checks"] if c["name"] == "stored codes and scales equal the reference's")
    assert codes["passed"] and codes["detail"] == "22 layers"
    probe = next(c for c in report["checks"] if c["name"] == "activation codes equal the reference numerics (bit exact)")
    assert probe["passed"] and "in 2 activation quantizers" in probe["detail"]  # the two Q/DQ adaLN layers


@pytest.fixture(scope="module")
def exported(tiny_source, tmp_path_factory):
    """A W4A8 ``qdq`` export of the tiny DiT (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("targets") / "m"
    loaded = ditq.load_model(str(tiny_source))
    ditq.export(ditq.quantize(loaded.model, Recipe(LayerQuant(4, 8, G))), out, source=loaded.source)
    return out


def with_plans(exported, tmp_path, value: str | None):
    """A copy of ``exported`` whose ``ditq.plans`` is ``value`` (None: the key removed)."""
    folder = tmp_path / "m"
    shutil.copytree(exported, folder)
    model = onnx.load(str(folder / "model.onnx"))
    kept = [p for p in model.metadata_props if p.key != KEY]
    assert len(kept) == len(model.metadata_props) - 1
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if value is not None:
        model.metadata_props.add(key=KEY, value=value)
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def edited(exported, **fields) -> str:
    """The export's record with ``fields`` replaced in its first layer (a field set to ... is removed)."""
    rec = json.loads(metadata(exported / "model.onnx")[KEY])
    first = rec[next(iter(rec))]
    for k, v in fields.items():
        if v is ...:
            del first[k]
        else:
            first[k] = v
    return json.dumps(rec)


GARBLED = {
    "missing": (None, "records no layer plans (ditq.plans): re-export with this ditq"),
    "not json": (lambda e: "{not json", "ditq.plans: not valid JSON"),
    "array": (lambda e: "[]", "ditq.plans: expected a JSON object, got a JSON array"),
    "layer not an object": (lambda e: '{"proj_out_1": 5}', "expected a JSON object, got 5"),
    "unknown kernel": (lambda e: edited(e, kernel="gpu"), 'kernel must be one of "qdq", "int8_gemm", "nbits", "nbits_qdq"'),
    "wbits a string": (lambda e: edited(e, wbits="4"), "wbits must be an integer in 2..8 or 1.58, got '4'"),
    "wbits a boolean": (lambda e: edited(e, wbits=True), "wbits must be an integer in 2..8 or 1.58, got true"),
    "wbits 9": (lambda e: edited(e, wbits=9), "wbits must be an integer in 2..8 or 1.58, got 9"),
    "width 0": (lambda e: edited(e, in_features=0), "in_features must be an integer in 1..16777216"),
    "field missing": (lambda e: edited(e, act_group=...), "act_group is missing"),
    "field unknown": (lambda e: edited(e, bias=1), "unknown field 'bias'"),
    "ternary asymmetric": (lambda e: edited(e, wbits=1.58, symmetric=False), "ternary weights (wbits 1.58) are symmetric"),
    "too large": (lambda e: json.dumps({"x": "y" * (1 << 20)}), "more than the 1048576 allowed"),
    "too deep": (lambda e: "[" * 100 + "]" * 100, "nested"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GARBLED))
def test_a_missing_or_garbled_record_is_one_line_exit_2(exported, tmp_path, capsys, case):
    make, needle = GARBLED[case]
    folder = with_plans(exported, tmp_path, None if make is None else make(exported))
    code, _, err = run(["validate", str(folder)], capsys)
    assert_one_line_refusal(code, err, needle, "re-export with this ditq")


@pytest.mark.parametrize("fields,detail", [
    ({"wbits": 8}, "recorded linear 256->64 W8A8g16"),  # W4 stored, the recipe says W4: the record lies
    ({"kernel": "nbits", "act_group": 16, "act_symmetric": True}, "target qdq computes"),  # an ort kernel in a qdq file
])  # fmt: skip
def test_a_well_formed_record_the_recipe_does_not_give_fails_validation(exported, tmp_path, capsys, fields, detail):
    folder = with_plans(exported, tmp_path, edited(exported, **fields))
    code, out, err = run(["validate", str(folder), "--json", str(tmp_path / "v.json")], capsys)
    assert code == 1, out + err
    report = json.loads((tmp_path / "v.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == PLANS_CHECK)
    first = next(iter(json.loads(metadata(exported / "model.onnx")[KEY])))
    assert check["passed"] is False and check["detail"].startswith(f"1 problem(s): {first!r}: ") and detail in check["detail"]
    assert report["cases"] == []  # nothing is rebuilt from a record that is not the recipe's
