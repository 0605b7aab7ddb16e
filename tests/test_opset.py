"""`--opset`: an explicit opset that cannot hold 2-bit codes is refused; the default takes what the recipe
needs; the manifest states the opset model.onnx actually imports."""

import json

import onnx
import pytest
from onnx import TensorProto

import ditq
from ditq.adapters import adapter_for
from tests.conftest import assert_one_line_refusal, run

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


def written(folder):
    """(IR version, default-domain opset import, manifest opset, count of INT2/UINT2 initializers)."""
    proto = onnx.load(str(folder / "model.onnx"))
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert len(opsets) == 1
    manifest = json.loads((folder / "manifest.json").read_text())
    int2 = sum(t.data_type in (TensorProto.INT2, TensorProto.UINT2) for t in proto.graph.initializer)
    return proto.ir_version, opsets[0], manifest["opset"], int2


def test_explicit_opset_21_with_2bit_codes_is_refused_naming_25(tmp_path, capsys, tiny_folder):
    out = tmp_path / "out"
    code, _, err = run(["export", "--model", tiny_folder, "--wbits", "2", "--abits", "8", "--opset", "21", "--out", str(out)], capsys)
    assert_one_line_refusal(code, err, "opset 21", "opset 25")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left either


@pytest.mark.parametrize("wbits,want", [("2", (13, 25)), ("4", (10, 21))])
def test_default_opset_is_what_the_recipe_needs_and_the_manifest_says_it(tmp_path, capsys, tiny_folder, wbits, want):
    out = tmp_path / "out"
    code, _, err = run(["export", "--model", tiny_folder, "--wbits", wbits, "--abits", "8", "--out", str(out)], capsys)
    assert code == 0, err
    ir, opset, manifest_opset, int2 = written(out)
    assert (ir, opset) == want and manifest_opset == opset
    assert (int2 > 0) == (wbits == "2")


@pytest.mark.slow
def test_explicit_opset_25_holds_2bit_codes_and_validates(tmp_path, capsys, tiny_folder):
    out = tmp_path / "out"
    code, _, err = run(["export", "--model", tiny_folder, "--wbits", "2", "--abits", "8", "--opset", "25", "--out", str(out)], capsys)
    assert code == 0, err
    ir, opset, manifest_opset, int2 = written(out)
    assert (ir, opset, manifest_opset) == (13, 25, 25) and int2 > 0
    report = ditq.validate(out)
    assert report.passed, report.table()



@pytest.mark.parametrize("opset", ["99", "26", "28", "20", "9" * 5000], ids=["99", "26", "28", "20", "5000 digits"])
def test_an_opset_outside_21_to_25_is_refused_before_anything_is_written(tmp_path, capsys, opset):
    """25 is the highest opset ditq is tested at (ONNX Runtime 1.31 refuses 27, which onnx 1.23 defines).
    Before: ``--opset 99`` exported with exit 0 and wrote opset 99 into the model and the manifest."""
    out = tmp_path / "out"
    code, _, err = run(["export", "--model", "digits", "--opset", opset, "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditq: error: argument --opset: expected an integer in 21..25, got "), err
    assert list(tmp_path.iterdir()) == []


def test_the_library_refuses_an_opset_above_what_onnx_runtime_loads(tmp_path, tiny_dit):
    import onnxruntime as ort
    from onnx import helper

    from ditq.errors import DitqError
    from ditq.fileformat import MAX_OPSET
    from ditq.recipe import Recipe

    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    model = helper.make_model(relu, opset_imports=[helper.make_opsetid("", MAX_OPSET)], ir_version=10)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # the highest allowed loads
    assert MAX_OPSET <= onnx.defs.onnx_opset_version()
    qdit = ditq.quantize(tiny_dit, Recipe.qdit(DIT, 4, 8, 64))
    for opset in (MAX_OPSET + 1, 99):
        with pytest.raises(DitqError, match=f"opset {opset} is above 25, the highest ditq writes"):
            ditq.export(qdit, tmp_path / "out", source={"kind": "builtin", "name": "digits"}, opset=opset, progress=False)
    assert list(tmp_path.iterdir()) == []
