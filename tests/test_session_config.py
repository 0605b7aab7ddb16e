"""The ONNX Runtime session configuration a model needs is recorded in it, and `validate` measures what a
default session (a deployer's plain ``InferenceSession``) computes next to the validated one.

A weight-only QDQ layer (``DequantizeLinear(weight) -> MatMul``) is fused by ONNX Runtime into
``MatMulNBits``, which by default quantizes its activations to int8 (accuracy level 4): on the tiny DiT
at W4A16 that session agrees with the graph's own arithmetic to about 46 dB, against 130 dB with
``session.qdq_matmulnbits_accuracy_level=0``."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import ditq
from ditq.adapters import adapter_for
from ditq.cli import main
from ditq.recipe import Recipe

DIT_ADAPTER = adapter_for("DiTTransformer2DModel")  # the family of the models here
DIT = DIT_ADAPTER.coverage

KEY = "ditq.session_config"
NEEDED = {"session.qdq_matmulnbits_accuracy_level": "0"}
DEFAULT_CHECK = "default ONNX Runtime session"
# Without quantized activations only fp32 reassociation separates two exact evaluations of the graph:
# validate's bound for weight-only models (relative error 1e-4).
FP32_BOUND_DB = 80.0


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2)))


def _export(source, out, abits, target):
    loaded = ditq.load_model(str(source))
    qdit = ditq.quantize(loaded.model, Recipe.qdit(DIT, 4, abits, 64), target=target)
    ditq.export(qdit, out, source=loaded.source)
    return qdit, loaded


@pytest.fixture(scope="module")
def w4a16(tiny_source, tmp_path_factory):
    """A tiny DiT exported W4A16 ``qdq`` (block-quantized weights, float activations)."""
    out = tmp_path_factory.mktemp("w4a16") / "m"
    qdit, loaded = _export(tiny_source, out, None, "qdq")
    return out, qdit, loaded


def _meta(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_qdq_export_records_the_session_config_in_metadata_and_manifest(w4a16):
    out, _, _ = w4a16
    assert json.loads(_meta(out / "model.onnx")[KEY]) == NEEDED
    assert json.loads((out / "manifest.json").read_text())["session_config"] == NEEDED


def test_a_plain_session_with_the_recorded_config_agrees_within_the_bound(w4a16):
    """Read the setting as a deployer would (onnx metadata, no ditq code) and compare the session with
    ONNX's own reference evaluator and with ditq's PyTorch reference."""
    out, qdit, loaded = w4a16
    x, t, y = DIT_ADAPTER.example_inputs(dict(loaded.model.config), batch=2, seed=3)
    feeds = dict(zip(DIT_ADAPTER.input_names, (x.numpy(), t.numpy(), y.numpy())))
    want = ReferenceEvaluator(str(out / "model.onnx")).run(None, feeds)[0]
    torch_ref = qdit.reference()(x, timestep=t, class_labels=y).sample.detach().numpy()

    so = ort.SessionOptions()
    for k, v in json.loads(_meta(out / "model.onnx")[KEY]).items():
        so.add_session_config_entry(k, v)
    configured = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    plain = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert snr_db(want, configured) >= FP32_BOUND_DB
    assert snr_db(torch_ref, configured) >= FP32_BOUND_DB
    assert snr_db(want, plain) < FP32_BOUND_DB - 20  # the setting is what makes the difference (measured 47 dB)


def test_validate_reports_the_default_session_next_to_the_validated_one(w4a16, tmp_path):
    out, _, _ = w4a16
    report = ditq.validate(out, progress=False)
    assert report.passed, report.table()
    assert report.session_config == NEEDED
    check = next(c for c in report.checks if c.name.startswith(DEFAULT_CHECK))
    assert check.passed and "records the config it needs" in check.detail
    for case in report.cases:
        assert case.sqnr_ort_vs_ref_db >= FP32_BOUND_DB
        assert case.sqnr_default_vs_ref_db < FP32_BOUND_DB and case.default_passed is False
    as_json = report.to_dict()
    assert as_json["session_config"] == NEEDED
    assert all(isinstance(c["sqnr_default_vs_ref_db"], float) for c in as_json["cases"])
    assert "default" in report.table()


def test_validate_fails_when_the_recorded_config_is_removed(w4a16, tmp_path, capsys):
    out, _, _ = w4a16
    tampered = tmp_path / "m"
    shutil.copytree(out, tampered)
    model = onnx.load(str(tampered / "model.onnx"))
    kept = [p for p in model.metadata_props if p.key != KEY]
    assert len(kept) == len(model.metadata_props) - 1
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tampered / "model.onnx"))

    code = main(["--quiet", "validate", str(tampered), "--json", str(tmp_path / "v.json")])
    capsys.readouterr()
    assert code == 1
    report = json.loads((tmp_path / "v.json").read_text())
    check = next(c for c in report["checks"] if c["name"].startswith(DEFAULT_CHECK))
    assert check["passed"] is False and "records no config" in check["detail"]
    assert report["session_config"] is None
    # the graph itself is still exact (ditq's own session runs it as it states): the missing record fails it
    assert all(c["passed"] for c in report["cases"])


@pytest.mark.slow
def test_ort_target_needs_no_session_config(tiny_source, tmp_path):
    """The ``ort`` target writes its kernels explicitly: a default session computes what is validated."""
    _export(tiny_source, tmp_path / "m", None, "ort")
    assert json.loads(_meta(tmp_path / "m" / "model.onnx")[KEY]) == {}
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["session_config"] == {}
    report = ditq.validate(tmp_path / "m", progress=False)
    assert report.passed, report.table()
    for case in report.cases:
        assert case.sqnr_default_vs_ref_db == case.sqnr_ort_vs_ref_db and case.default_passed


# ---------------------------------------------------------------- tampered ditq.session_config metadata

TAMPERED_SESSION_CONFIGS = {  # metadata value -> what the one-line refusal says
    '{"session.qdq_matmulnbits_accuracy_level": ' + "9" * 5000 + "}": "an integer with too many digits",
    "[" * 100_000 + "]" * 100_000: "nested",
    '{"a": ' + "[" * 40 + "]" * 40 + "}": "nested",
    "[]": "expected a JSON object",
    '{"session.qdq_matmulnbits_accuracy_level": 0}': "must be one of '0', '1', '2', '3', '4', got 0",
    '{"session.qdq_matmulnbits_accuracy_level": "5"}': "got '5'",
    '{"session.intra_op.allow_spinning": "0"}': "'session.intra_op.allow_spinning' is not a config entry ditq applies",
    '{"session.qdq_matmulnbits_accuracy_level": "0", "session.use_env_allocators": "1"}': "is not a config entry",
}


def _with_session_config(src, dst, value: str):
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    entry = next(p for p in model.metadata_props if p.key == KEY)
    entry.value = value
    onnx.save(model, str(dst / "model.onnx"))
    return dst


@pytest.mark.parametrize("value", list(TAMPERED_SESSION_CONFIGS), ids=range(len(TAMPERED_SESSION_CONFIGS)))
def test_sample_refuses_a_tampered_session_config_in_one_line(w4a16, tmp_path, capsys, value):
    """Only the accuracy-level entry, with a level 0..4, reaches ONNX Runtime. Before: a 5000-digit
    integer or deep nesting was a ValueError/RecursionError traceback, and any other entries were applied."""
    m = _with_session_config(w4a16[0], tmp_path / "m", value)
    out = tmp_path / "x.npy"
    code = main(["--quiet", "sample", str(m), "--classes", "0", "--per-class", "1", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"ditq: error: {m / 'model.onnx'}: {KEY}: ") and TAMPERED_SESSION_CONFIGS[value] in lines[0], lines[0]
    assert len(lines[0]) < 300 and not out.exists()


@pytest.mark.parametrize("level", ["0", "1", "2", "3", "4"])
def test_each_accuracy_level_is_accepted_as_recorded(level):
    from ditq.runtime.session import recorded_session_config

    recorded = recorded_session_config({KEY: json.dumps({"session.qdq_matmulnbits_accuracy_level": level})}, "m.onnx")
    assert recorded == {"session.qdq_matmulnbits_accuracy_level": level}
    assert recorded_session_config({KEY: "{}"}, "m.onnx") == {} and recorded_session_config({}, "m.onnx") is None


def _case(default_passed: bool):
    from ditq.workflows.validate import CaseResult

    return CaseResult(batch=1, timesteps=[999], classes=[0], sqnr_ort_vs_ref_db=130.0, max_abs_ort_vs_ref=1e-6,
                      sqnr_ref_vs_float_db=30.0, sqnr_ort_vs_float_db=30.0, bound_db=FP32_BOUND_DB, passed=True,
                      sqnr_default_vs_ref_db=47.0 if not default_passed else 130.0, default_passed=default_passed)  # fmt: skip


@pytest.mark.parametrize(
    "recorded,passes",
    [(NEEDED, True), ({"session.qdq_matmulnbits_accuracy_level": "4"}, False),
     ({"session.qdq_matmulnbits_accuracy_level": "1"}, False), ({}, False), (None, False)],
)  # fmt: skip
def test_a_failing_default_session_is_excused_only_by_recording_level_0(recorded, passes):
    """Before: any non-empty recorded config passed the check, even level 4, the default that fails."""
    from ditq.workflows.validate import default_session_check

    check = default_session_check([_case(True), _case(False)], recorded, NEEDED)
    assert check.passed is passes, check
    if not passes and recorded is not None:
        assert "not session.qdq_matmulnbits_accuracy_level=0" in check.detail, check.detail
    assert default_session_check([_case(True)], recorded, NEEDED).passed  # a default session that meets the bound
