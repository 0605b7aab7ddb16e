"""``ditq bench``: variants parsed, every ratio taken against the float model of the same run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ditq.adapters import adapter_for
from ditq.cli import main
from ditq.errors import DitqError
from ditq.models import load_model
from ditq.recipe import Recipe, Rule
from ditq.workflows.bench import BenchReport, BenchRow, check_goals, parse_variants
from ditq.workflows.evaluate import parse_configs

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


def test_parse_variants():
    vs = parse_variants("w8a8, ort-int8,w4a8g32@qdq,w4a16gch,fp,w1.58a2h", 128)
    assert [v.name for v in vs] == ["float", "w8a8@ort", "ort-int8", "w4a8g32@qdq", "w4a16gch@ort", "w1.58a2h@ort"]
    w8, w4, w16, tern = vs[1].config, vs[3].config, vs[4].config, vs[5].config
    assert (w8.group_size, w4.group_size, w4.base_group, vs[3].target.name, w16.group_size, w16.abits) == (128, 32, 128, "qdq", None, None)
    assert (tern.ternary, tern.rotate, tern.abits, vs[5].target.name) == (True, True, 2, "ort")
    # the same grammar as eval: the recipe a variant builds is eval's
    assert vs[1].config.options() == parse_configs("w8a8", 128)[0].options()
    with pytest.raises(DitqError, match="w9a8"):
        parse_variants("w9a8", 128)
    with pytest.raises(DitqError, match="twice"):
        parse_variants("w8a8,w8a8@ort", 128)
    with pytest.raises(DitqError, match="sensitivity"):
        parse_variants("w1.58a2hm", 128)
    with pytest.raises(DitqError, match="not found: nowhere.json"):
        parse_variants("nowhere.json", 128)


def test_variant_recipe_path_keeps_its_case(tmp_path):
    path = tmp_path / "Searched.json"
    path.write_text(Recipe.qdit(DIT, 4, 8, 64).to_json())
    (v,) = parse_variants(f"ORT-INT8,{path}", 128)[2:]
    assert (v.name, v.config.recipe_file, v.config.build(None).recipe) == ("Searched@ort", str(path), Recipe.qdit(DIT, 4, 8, 64))


def test_variants_take_the_auto_group_size(tiny_folder):
    """``--group-size auto`` (bench's default) resolves against the model: 64 on the tiny DiT (width 64);
    a gN of the variant stays its own."""
    loaded = load_model(str(tiny_folder))
    w4, w4g32 = (v.config.build(loaded).recipe for v in parse_variants("w4a8,w4a8g32", "auto")[1:])
    assert w4 == Recipe.qdit(DIT, 4, 8, 64)
    assert w4g32.rules == Recipe.qdit(DIT, 4, 8, 64).rules + tuple(Rule(m, {"group_size": 32}) for m in DIT.activation_linears)
    assert w4g32.default == w4.default


@pytest.mark.slow  # builds and times six variants in subprocesses: about 25 s
def test_bench_on_a_tiny_dit(tmp_path, tiny_dit):
    folder = tmp_path / "tiny"
    tiny_dit.save_pretrained(folder)
    js = tmp_path / "b.json"
    assert main(["--quiet", "bench", "--model", str(folder), "--variants", "ort-int8,ort-int4,w8a8,w4a8,w1.58a4h",
                 "--group-size", "32", "--runs", "3", "--threads", "1", "--profile", "--json", str(js)]) == 0  # fmt: skip
    rows = {r["variant"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == ["float", "ort-int8", "ort-int4", "w8a8@ort", "w4a8@ort", "w1.58a4h@ort"]
    f = rows["float"]
    assert (f["latency_ratio"], f["size_ratio"], f["rss_ratio"], f["rel_error"]) == (1.0, 1.0, 1.0, 0.0)
    for name, r in rows.items():
        assert r["size_ratio"] == pytest.approx(r["file_bytes"] / f["file_bytes"], rel=1e-12)
        assert r["rss_ratio"] == pytest.approx(r["peak_rss_bytes"] / f["peak_rss_bytes"], rel=1e-12)
        assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / f["latency_ms"], rel=1e-9)
        assert r["peak_rss_bytes"] > 30e6  # a process with onnxruntime loaded, not the parent's number
        if name != "float":
            assert 0.0 < r["rel_error"] < 0.5 and r["size_ratio"] < 1.0
    assert rows["w4a8@ort"]["size_ratio"] < rows["w8a8@ort"]["size_ratio"] < rows["ort-int4"]["size_ratio"]
    # ternary block linears and adaLN (Recipe.robuq: 4-bit activations on both): 2-bit MatMulNBits behind
    # the exact activation Q/DQ, 7 per block
    assert rows["w1.58a4h@ort"]["kernels"]["nbits_qdq"] == 7 * tiny_dit.config.num_layers
    assert rows["w8a8@ort"]["kernels"]["int8_gemm"] == 6 * tiny_dit.config.num_layers
    for r in rows.values():  # profiles: shares of kernel time that add up, naming the variant's own kernels
        assert sum(r["profile"].values()) == pytest.approx(1.0)
    assert "MatMulIntegerToFloat" in rows["w8a8@ort"]["profile"] and "MatMulIntegerToFloat" not in rows["float"]["profile"]
    assert "MatMulNBits" in rows["w4a8@ort"]["profile"] and "MatMulNBits" in rows["w1.58a4h@ort"]["profile"]


def test_goal_check_reads_the_report():
    def row(name, speedup, err, size=0.1, rss=0.2):
        return BenchRow(name, 1 / speedup, size, rss, err, 1.0, 0.0, 1, 1, speedup)

    ok = BenchReport([row("float", 1, 0), row("ort-int8", 2.4, 0.02), row("w8a8@ort", 2.1, 0.01), row("w4a8@ort", 1.3, 0.03)])
    assert check_goals(ok) == []
    bad = BenchReport([row("float", 1, 0), row("ort-int8", 2.4, 0.02), row("w8a8@ort", 1.9, 0.03), row("w4a8@ort", 1.3, 0.03, rss=0.4)])
    fails = check_goals(bad)
    assert len(fails) == 3 and any("2.0x" in f for f in fails) and any("quantize_dynamic" in f for f in fails) and any("RSS" in f for f in fails)
    assert np.isfinite([r.latency_ratio for r in ok.rows]).all()


@pytest.mark.slow  # exports digits twice and samples 2 x 20 images: about 40 s
def test_bench_quality_columns_judge_the_digits_samples(tmp_path):
    """``--quality`` samples every variant after the torch model is released; the digits judge must then
    recognise the float model's and the W8A8 file's samples (10 DDIM steps already draw legible digits)."""
    js = tmp_path / "b.json"
    assert main(["--quiet", "bench", "--model", "digits", "--variants", "float,w8a8", "--group-size", "64", "--runs", "1",
                 "--quality", "20", "--steps", "10", "--threads", "1", "--json", str(js)]) == 0  # fmt: skip
    rows = {r["variant"]: r for r in json.loads(js.read_text())["rows"]}
    assert list(rows) == ["float", "w8a8@ort"]
    for r in rows.values():
        assert r["class_accuracy"] >= 0.8 and 0.0 < r["fid"] < 50.0, r


def test_importing_bench_leaves_the_root_logger_alone():
    """ONNX Runtime's int4 quantizer module calls ``logging.basicConfig(level=INFO)`` when imported; bench
    must not import it at load time, or every later ONNX pass would print its INFO lines."""
    import subprocess
    import sys

    code = "import logging, ditq.workflows.bench as b; r = logging.getLogger(); print(len(r.handlers), r.level)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["0", str(logging.WARNING)]


def test_a_worker_killed_mid_run_is_one_line_naming_its_model(tmp_path):
    """A worker the system kills (the out-of-memory killer's SIGKILL) is reported in one line naming the
    variant's file and the signal, not as a BrokenPipeError traceback."""
    import signal

    import onnx
    from onnx import TensorProto, helper

    from ditq.workflows.bench import _Worker

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), model)
    np.savez(tmp_path / "inputs.npz", x=np.ones((1, 4), np.float32))
    worker = _Worker(model, tmp_path / "inputs.npz", tmp_path / "out.npy", 1, "cpu")
    assert worker.ask()["ready"]
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait()
    with pytest.raises(DitqError) as e:
        worker.ask("run")
    msg = str(e.value)
    assert "\n" not in msg and str(model) in msg and "killed by signal 9" in msg, msg
