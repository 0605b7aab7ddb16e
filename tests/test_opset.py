"""`--opset`: an explicit opset that cannot hold 2-bit codes is refused; the default takes what the recipe
needs; the manifest states the opset model.onnx actually imports."""

import json

import onnx
import pytest
from onnx import TensorProto

import ditq
from ditq.cli import main


def run(argv, capsys):
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_folder(tmp_path, tiny_dit):
    tiny_dit.save_pretrained(tmp_path / "dit")
    return str(tmp_path / "dit")


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
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditq: error: "), err
    assert "opset 21" in lines[0] and "opset 25" in lines[0], lines[0]
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


def test_explicit_opset_25_holds_2bit_codes_and_validates(tmp_path, capsys, tiny_folder):
    out = tmp_path / "out"
    code, _, err = run(["export", "--model", tiny_folder, "--wbits", "2", "--abits", "8", "--opset", "25", "--out", str(out)], capsys)
    assert code == 0, err
    ir, opset, manifest_opset, int2 = written(out)
    assert (ir, opset, manifest_opset) == (13, 25, 25) and int2 > 0
    report = ditq.validate(out)
    assert report.passed, report.table()

