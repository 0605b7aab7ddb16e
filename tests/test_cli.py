"""The command line: bad input gives one line and exit 2 with nothing written; the happy path works."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ditq.adapters import adapter_for
from ditq.recipe import Recipe
from tests.conftest import assert_no_output, assert_one_line_refusal, run

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


def test_missing_model(tmp_path, capsys):
    code, _, err = run(["export", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "missing.pt", "neither a built-in model")
    assert_no_output(tmp_path)


def test_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02not a safetensors file")
    code, _, err = run(["export", "--model", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "bad.safetensors", "corrupt")
    assert_no_output(tmp_path)


def test_unsupported_architecture(tmp_path, capsys):
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(tmp_path / "vit.safetensors"))
    code, _, err = run(["export", "--model", str(tmp_path / "vit.safetensors"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "unsupported architecture")
    assert_no_output(tmp_path)


def test_group_size_that_does_not_divide(tmp_path, capsys, tiny_folder):
    code, _, err = run(["export", "--model", tiny_folder, "--group-size", "48", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "group size 48", "layer 'transformer_blocks.0.")
    assert_no_output(tmp_path)


@pytest.mark.parametrize("flag,value,needle", [("--wbits", "9", "wbits"), ("--wbits", "1", "wbits"), ("--abits", "9", "abits"), ("--abits", "0", "abits"), ("--wbits", "1.5", "1.58")])
def test_impossible_bit_widths(tmp_path, capsys, tiny_folder, flag, value, needle):
    code, _, err = run(["export", "--model", tiny_folder, flag, value, "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, needle)
    assert_no_output(tmp_path)


def test_bad_recipe(tmp_path, capsys, tiny_folder):
    (tmp_path / "r.json").write_text('{"format": "ditq-recipe", "default": {"wbits": 4, "group_size": 3.5}}')
    code, _, err = run(["export", "--model", tiny_folder, "--recipe", str(tmp_path / "r.json"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "r.json", "group_size")
    assert_no_output(tmp_path)


def test_validate_bad_input(tmp_path, capsys):
    code, _, err = run(["validate", str(tmp_path / "nothing")], capsys)
    assert_one_line_refusal(code, err, "no exported model")
    assert_no_output(tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 50)
    code, _, err = run(["validate", str(tmp_path / "junk.onnx")], capsys)
    assert_one_line_refusal(code, err, "junk.onnx")
    assert_no_output(tmp_path)


def test_export_validate_recipe_round_trip(tmp_path, capsys, tiny_folder):
    code, _, err = run(["recipe", "--model", tiny_folder, "--wbits", "6", "--group-size", "16", "--out", str(tmp_path / "r.json")], capsys)
    assert code == 0 and Recipe.load(tmp_path / "r.json") == Recipe.qdit(DIT, 6, 8, 16)
    code, out, _ = run(["export", "--model", tiny_folder, "--recipe", str(tmp_path / "r.json"), "--out", str(tmp_path / "m")], capsys)
    assert code == 0 and "wrote" in out
    code, out, _ = run(["validate", str(tmp_path / "m"), "--json", str(tmp_path / "v.json")], capsys)
    assert code == 0 and "PASSED" in out
    import json

    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] is True and len(report["cases"]) == 3


def test_console_script_exit_codes(tmp_path):
    """The installed entry point, in a fresh process: bad input is one line on stderr, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "ditq.cli", "export", "--model", "dit-q-9", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("ditq: error: model not found")
    assert not (tmp_path / "out").exists()


def test_cuda_provider_unavailable_is_one_line(tmp_path, capsys, tiny_folder, monkeypatch):
    """Where ONNX Runtime has no CUDA provider, --provider cuda stops with one line. A machine with CUDA
    runs the same check: its ONNX Runtime is made to list the CPU provider only."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    out = tmp_path / "m"
    assert run(["export", "--model", tiny_folder, "--wbits", "8", "--abits", "8", "--group-size", "32", "--out", str(out)], capsys)[0] == 0
    code, _, err = run(["sample", str(out), "--provider", "cuda", "--steps", "2", "--out", str(tmp_path / "x.npy")], capsys)
    assert_one_line_refusal(code, err, "CUDA is not available")
    assert not (tmp_path / "x.npy").exists()


def test_group_size_auto_fits_the_model(tmp_path, capsys, tiny_folder):
    """The default group size is the largest of 128/64/32/16 that every covered layer's width takes."""
    from ditq.errors import DitqError
    from ditq.models import build_dit
    from ditq.recipe import auto_group_size

    from tests.conftest import tiny_config

    def auto(hidden):
        return auto_group_size(build_dit(tiny_config(hidden=hidden), seed=0), lambda g: Recipe.qdit(DIT, 4, 8, g))

    assert (auto(128), auto(64), auto(96), auto(48)) == (128, 64, 32, 16)
    with pytest.raises(DitqError, match=r"group size 128 does not divide.*no group size of 128, 64, 32, 16 fits"):
        auto(40)
    # the CLI: resolved against --model (tiny: width 64), 128 without one
    assert run(["recipe", "--model", tiny_folder, "--out", str(tmp_path / "r.json")], capsys)[0] == 0
    assert Recipe.load(tmp_path / "r.json") == Recipe.qdit(DIT, 4, 8, 64)
    code, out, _ = run(["recipe"], capsys)
    assert code == 0 and Recipe.from_json(out) == Recipe.qdit(DIT, 4, 8, 128)
