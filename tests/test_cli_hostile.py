"""Hostile and careless command lines: every bad value is one line ``ditq: error: ...``, exit 2, nothing
written; a model that produces NaN/Inf or fails inside ONNX Runtime stops the run the same way."""

from __future__ import annotations

import contextlib
import json
import math
import signal

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from ditq import cli
from ditq.cli import main
from ditq.errors import DitqError
from ditq.models import BUILTIN_PIPELINE, build_dit, dit_config
from tests.conftest import assert_one_line_refusal, run

# A digits-shaped DiT (1 channel, 8x8, 10 classes) small enough to export in seconds.
DIGITS_LIKE = dit_config(32, 1, 2, patch=2, in_channels=1, out_channels=1, sample_size=8, num_classes=10)


@contextlib.contextmanager
def within(seconds: float):
    """Fail (instead of running for hours) when the block takes longer than ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A digits-like model exported by ``ditq export``; it samples in pixel space and is judged like digits."""
    root = tmp_path_factory.mktemp("hostile")
    build_dit(DIGITS_LIKE, seed=0).save_pretrained(root / "dit")
    (root / "dit" / "ditq_pipeline.json").write_text(BUILTIN_PIPELINE["digits"].to_json())
    assert main(["--quiet", "export", "--model", str(root / "dit"), "--wbits", "8", "--abits", "8",
                 "--group-size", "16", "--out", str(root / "m")]) == 0  # fmt: skip
    meta = {p.key: p.value for p in onnx.load(root / "m" / "model.onnx").metadata_props}
    assert json.loads(meta["ditq.pipeline"])["judge"] == "digits"
    return root / "m"


def hostile_model(folder, exported, nodes, initializers):
    """A model folder whose graph is ``nodes`` (inputs sample/timestep/class_labels, output ``out``),
    carrying the metadata of the real export so that ``ditq sample`` opens it."""
    src = onnx.load(exported / "model.onnx")
    graph = helper.make_graph(
        nodes, "hostile", [helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type, ["B", *([1, 8, 8] if i.name == "sample" else [])]) for i in src.graph.input],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    model.metadata_props.extend(src.metadata_props)
    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    return folder


def test_hostile_model_inputs_match_the_export(exported):
    assert [i.name for i in onnx.load(exported / "model.onnx").graph.input] == ["sample", "timestep", "class_labels"]


# ---------------------------------------------------------------- ditq sample: bad values, one line each


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--steps", "0", "argument --steps: expected an integer in 1..1000, got '0'"),
        ("--steps", "-1", "argument --steps: expected an integer in 1..1000, got '-1'"),
        ("--steps", "1001", "argument --steps: expected an integer in 1..1000, got '1001'"),
        ("--batch-size", "0", "argument --batch-size: expected an integer in 1..4096"),
        ("--seed", "-1", "argument --seed: expected an integer in 0..4294967295, got '-1'"),
        ("--per-class", "0", "argument --per-class: expected an integer in 1..1000000000"),
        ("--cfg", "nan", "argument --cfg: expected a finite number in [0, 100], got 'nan'"),
        ("--cfg", "inf", "argument --cfg: expected a finite number in [0, 100], got 'inf'"),
        ("--cfg", "-inf", "argument --cfg"),
        ("--cfg", "1e999", "argument --cfg"),
        ("--classes", "99999999999999999999999", "--classes: expected integers in 0..9, got '99999999999999999999999'"),
        ("--classes", "-1", "--classes: expected integers in 0..9, got '-1'"),
        ("--classes", "10", "--classes: expected integers in 0..9, got '10'"),
        ("--classes", "1,x", "--classes: expected comma-separated integers in 0..9, got '1,x'"),
        ("--classes", ",", "--classes is empty"),
    ],
)  # fmt: skip
def test_sample_refuses_bad_values(tmp_path, capsys, exported, flag, value, needle):
    out = tmp_path / "grid.png"
    code, _, err = run(["sample", str(exported), "--steps", "2", flag, value, "--out", str(out)], capsys)
    assert_one_line_refusal(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_echoed_values_are_cut_to_a_sane_length(tmp_path, capsys, exported):
    code, _, err = run(["sample", str(exported), "--steps", "7" * 100_000, "--out", str(tmp_path / "x.npy")], capsys)
    assert_one_line_refusal(code, err, "argument --steps", "(100000 characters)")
    assert len(err) < 300
    code, _, err = run(["sample", str(exported), "--classes", "x" * 100_000, "--out", str(tmp_path / "x.npy")], capsys)
    assert_one_line_refusal(code, err, "--classes")
    assert len(err) < 300 and list(tmp_path.iterdir()) == []


def test_sample_counts_beyond_the_memory_budget_are_refused_before_any_work(tmp_path, capsys, exported):
    """10 classes x 10^6 samples of 1x8x8 float32 are 2.56 GB, over the 1 GiB budget; the grid of one class
    x 10^5 samples would be 6.6M x 68 pixels. Both stop at once (before: hours of sampling)."""
    with within(20):
        code, _, err = run(["sample", str(exported), "--per-class", "1000000", "--out", str(tmp_path / "x.npy")], capsys)
    assert_one_line_refusal(code, err, "10000000 samples of 1x8x8 would take 2.38 GiB, over the limit of 1 GiB")
    with within(20):
        code, _, err = run(["sample", str(exported), "--classes", "0", "--per-class", "100000", "--out", str(tmp_path / "g.png")], capsys)
    assert_one_line_refusal(code, err, "a grid of 1 x 100000 images would be 6600002 x 68 pixels")
    assert list(tmp_path.iterdir()) == []


def test_budget_allows_what_fits(exported, monkeypatch):
    """At the budget's edge: exactly MAX_SAMPLE_BYTES passes, one sample more is refused."""
    from ditq.runtime import generate

    monkeypatch.setattr(generate, "MAX_SAMPLE_BYTES", 3 * 256)
    model = generate.ExportedDiT.open(exported)
    model.check_count(3)
    with pytest.raises(DitqError, match="4 samples of 1x8x8"):
        model.check_count(4)
    assert model.generate(np.array([0, 1, 2]), steps=2).shape == (3, 1, 8, 8)


def test_sample_happy_path_reports_the_judge(tmp_path, capsys, exported):
    code, out, err = run(["sample", str(exported), "--classes", "0,1", "--per-class", "2", "--steps", "2", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0 and "the digit judge recognises" in out, err
    assert (tmp_path / "g.png").is_file()


# ---------------------------------------------------------------- models that produce nonsense or fail inside ORT


def test_nan_output_stops_sampling_and_the_judge_never_scores_it(tmp_path, capsys, exported):
    """A model whose output is NaN: before, class 0 was written as a NaN grid that 'the digit judge
    recognises 100.0%' (NaN logits argmax to class 0)."""
    model = hostile_model(tmp_path / "nan", exported, [helper.make_node("Mul", ["sample", "nan"], ["out"])],
                          [numpy_helper.from_array(np.array(np.nan, np.float32), "nan")])  # fmt: skip
    for cfg in ("1", "1.5"):
        code, out, err = run(["sample", str(model), "--classes", "0", "--per-class", "2", "--steps", "3", "--cfg", cfg,
                              "--out", str(tmp_path / "g.png")], capsys)  # fmt: skip
        assert_one_line_refusal(code, err, "sampling stopped at timestep 999: the model's output holds NaN or Inf values")
        assert "judge" not in out and not (tmp_path / "g.png").exists()


def test_the_digit_judge_refuses_non_finite_images():
    from ditq.runtime.metrics import DigitJudge

    judge = DigitJudge.load()
    for bad in (np.nan, np.inf, -np.inf):
        images = np.zeros((3, 1, 8, 8), np.float32)
        images[1, 0, 4, 4] = bad
        with pytest.raises(DitqError, match=r"non-finite images \(1 of 3 hold NaN or Inf\)"):
            judge.accuracy(images, np.zeros(3))
        with pytest.raises(DitqError):
            judge.features(images)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampler_stops_when_a_step_overflows(method):
    """Finite model outputs whose guided combination overflows float32 (3e38 apart, scale 100): before,
    the samples came back as Inf without a word."""
    from ditq.runtime.samplers import sample, seeded_noise

    def model(x, t, y):
        return np.where((y == 10)[:, None, None, None], -3e38, 3e38).astype(np.float32) * np.ones_like(x)

    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(DitqError, match="sampling stopped at timestep 500: the samples became NaN or Inf .guidance scale 100."):
        sample(model, seeded_noise(0, 2, 1, 4), np.array([0, 1]), steps=2, method=method, cfg=100.0, null_class=10)


def test_sampler_stops_on_a_nan_model_output():
    from ditq.runtime.samplers import sample, seeded_noise

    calls = []

    def model(x, t, y):
        calls.append(int(t[0]))
        return np.full_like(x, np.nan if len(calls) == 2 else 0.1)

    with pytest.raises(DitqError, match="sampling stopped at timestep 0: the model's output holds NaN or Inf"):
        sample(model, seeded_noise(0, 2, 1, 4), np.array([0, 1]), steps=2)  # timesteps 500, 0
    assert calls == [500, 0]


def test_onnx_runtime_failure_while_running_is_one_line(tmp_path, capfd, exported):
    """A graph that asks ONNX Runtime for 10^12 floats (4 TB): one line naming the model and the cause,
    exit 2, nothing written, and ONNX Runtime's own log silenced (fd 2 is captured too)."""
    shape = numpy_helper.from_array(np.array([10**6, 10**6], np.int64), "shape")
    model = hostile_model(tmp_path / "huge", exported, [helper.make_node("ConstantOfShape", ["shape"], ["out"])], [shape])
    code = main(["--quiet", "sample", str(model), "--classes", "0", "--per-class", "1", "--steps", "2", "--out", str(tmp_path / "x.npy")])
    _, err = capfd.readouterr()
    assert_one_line_refusal(code, err, f"{model / 'model.onnx'}: ONNX Runtime failed while running the model", "allocate")
    assert len(err) < 500 and not (tmp_path / "x.npy").exists()


def test_run_session_failure_is_a_ditq_error(exported):
    from ditq.runtime.session import OrtDiT

    fn = OrtDiT(exported / "model.onnx")
    with pytest.raises(DitqError, match="ONNX Runtime failed while running the model"):
        fn(np.zeros((1, 3, 8, 8), np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64))  # 3 channels, not 1


def concat_model(folder, exported, copies: int, shape):
    """A hostile model whose output is ``copies`` copies of its input along the channels, its graph
    output declared with ``shape``."""
    model = hostile_model(folder, exported, [helper.make_node("Concat", ["sample"] * copies, ["out"], axis=1)], [])
    proto = onnx.load(model / "model.onnx")
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("out", TensorProto.FLOAT, shape))
    onnx.save(proto, model / "model.onnx")
    return model


@pytest.mark.parametrize("copies", [2, 3])
def test_a_static_output_the_config_does_not_state_is_refused_on_open(tmp_path, capsys, exported, copies):
    """``ditq.model_config`` says 1 channel in and out. A graph that declares 2 output channels (which the
    sampler would read as learned variance) or 3 is refused when opened, naming the file. Before: 2
    channels sampled with exit 0; 3 were a ValueError traceback after the first model call."""
    model = concat_model(tmp_path / "m", exported, copies, ["B", copies, 8, 8])
    out = tmp_path / "x.npy"
    code, _, err = run(["sample", str(model), "--classes", "0", "--per-class", "1", "--steps", "2", "--out", str(out)], capsys)
    assert_one_line_refusal(code, err, f"{model / 'model.onnx'}: the graph's output has shape ['B', {copies}, 8, 8]; "
                                       "ditq.model_config says [batch, 1, h, w]")  # fmt: skip
    assert not out.exists()


def test_an_output_open_cannot_read_stops_the_sampler_in_one_line(tmp_path, capsys, exported):
    """An output declared ``[?, 3, 64]``, reshaped to 3 channels of 8x8 by nothing: the sampler's own check
    of the model's output. Before: a ValueError traceback."""
    model = hostile_model(tmp_path / "m", exported, [
        helper.make_node("Concat", ["sample"] * 3, ["c"], axis=1), helper.make_node("Reshape", ["c", "shape"], ["out"])],
        [numpy_helper.from_array(np.array([-1, 3, 64], np.int64), "shape")])  # fmt: skip
    out = tmp_path / "x.npy"
    code, _, err = run(["sample", str(model), "--classes", "0", "--per-class", "1", "--steps", "2", "--out", str(out)], capsys)
    assert_one_line_refusal(code, err, "the model's output has 3 channels; expected 1 or 2 for 1 input channels")
    assert not out.exists()


def test_learned_range_variance_without_variance_channels_is_one_error():
    """A schedule recording ``variance_type: learned_range`` for a model with no variance channels.
    Before: a ValueError (a traceback from ``ditq sample --sampler ddpm``)."""
    from ditq.runtime.samplers import sample, seeded_noise
    from ditq.schedule import SchedulerSpec

    with pytest.raises(DitqError, match="variance_type learned_range needs a model that outputs variance channels"):
        sample(lambda x, t, y: np.zeros_like(x), seeded_noise(0, 2, 1, 4), np.array([0, 1]), steps=2, method="ddpm",
               schedule=SchedulerSpec(variance_type="learned_range"))  # fmt: skip


# ---------------------------------------------------------------- the other commands: refused before any work


BAD_OPTIONS = [
    (["eval", "--num-samples", "1"], "argument --num-samples: expected an integer in 2..100000, got '1'"),  # the API's bound
    (["eval", "--num-samples", "99999999999999999999"], "argument --num-samples"),
    (["eval", "--steps", "1001"], "argument --steps: expected an integer in 1..1000"),
    (["eval", "--cfg", "nan"], "argument --cfg: expected a finite number"),
    (["eval", "--calib-samples", "-5"], "argument --calib-samples"),
    (["eval", "--calib-timesteps", "0"], "argument --calib-timesteps"),
    (["search", "--journal", "j", "--out", "o", "--population", "0"], "argument --population: expected an integer in 1..10000"),
    (["search", "--journal", "j", "--out", "o", "--generations", "-1"], "argument --generations"),
    (["search", "--journal", "j", "--out", "o", "--top-k", "0"], "argument --top-k"),
    (["search", "--journal", "j", "--out", "o", "--crossovers", "-1"], "argument --crossovers"),
    (["search", "--journal", "j", "--out", "o", "--mutations", "1e3"], "argument --mutations"),
    (["search", "--journal", "j", "--out", "o", "--workers", "0"], "argument --workers: expected an integer in 1..256"),
    (["search", "--journal", "j", "--out", "o", "--num-samples", "0"], "argument --num-samples"),
    (["search", "--journal", "j", "--out", "o", "--fitness-steps", "5000"], "argument --fitness-steps"),
    (["search", "--journal", "j", "--out", "o", "--rmse-weight", "nan"], "argument --rmse-weight: expected a finite number in [0, 1e+06]"),
    (["search", "--journal", "j", "--out", "o", "--seed", "-3"], "argument --seed"),
    (["fitness", "--configs", "w4a8", "--workers", "100000"], "argument --workers"),
    (["fitness", "--configs", "w4a8", "--rmse-weight", "inf"], "argument --rmse-weight"),
    (["bench", "--batch", "0"], "argument --batch: expected an integer in 1..4096"),
    (["bench", "--runs", "0"], "argument --runs"),
    (["bench", "--threads", "0"], "argument --threads: expected an integer in 1..1024"),
    (["bench", "--quality", "-1"], "argument --quality"),
    (["bench", "--steps", "0"], "argument --steps"),
    (["qat", "--out", "o", "--steps", "0"], "argument --steps: expected an integer in 1..10000000"),
    (["qat", "--out", "o", "--batch-size", "0"], "argument --batch-size"),
    (["qat", "--out", "o", "--lr", "nan"], "argument --lr: expected a finite number in (0, 1]"),
    (["qat", "--out", "o", "--lr", "0"], "argument --lr"),
    (["qat", "--out", "o", "--seed", "-1"], "argument --seed"),
    (["train-digits", "--steps", "0"], "argument --steps"),
    (["train-digits", "--seed", "4294967296"], "argument --seed: expected an integer in 0..4294967295"),
    (["export", "--model", "digits", "--out", "o", "--seed", "-1"], "argument --seed"),
    (["export", "--model", "digits", "--out", "o", "--num-heads", "0"], "argument --num-heads"),
    (["export", "--model", "digits", "--out", "o", "--calib-samples", "0"], "argument --calib-samples"),
]


@pytest.mark.parametrize("argv,needle", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_numeric_options_are_refused_before_the_command_runs(tmp_path, capsys, monkeypatch, argv, needle):
    for name in ("cmd_eval", "cmd_search", "cmd_fitness", "cmd_bench", "cmd_qat", "cmd_train_digits", "cmd_export"):
        monkeypatch.setattr(cli, name, lambda args: pytest.fail("the command ran with a bad value"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert_one_line_refusal(code, err, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--seeds", "0,-1"], "--seeds: expected integers in 0..4294967295, got '-1'"),
    (["fitness", "--configs", "w4a8", "--seeds", "1,99999999999999999999"], "--seeds: expected integers in 0..4294967295"),
])  # fmt: skip
def test_seed_lists_are_checked(tmp_path, capsys, monkeypatch, argv, needle):
    from ditq.workflows import fitness
    from ditq.workflows import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated with a bad seed"))
    monkeypatch.setattr(fitness, "ParallelFitness", lambda *a, **k: pytest.fail("evaluated with a bad seed"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert_one_line_refusal(code, err, needle)


def test_parser_errors_are_one_line(capsys):
    for argv in (["sample"], ["no-such-command"], ["recipe", "--unknown"], ["qat", "--out", "o", "--abits", "9"]):
        code, out, err = run(argv, capsys)
        assert_one_line_refusal(code, err)
        assert out == "" and "usage" not in err


# ---------------------------------------------------------------- property: any value, one line or success

EDGE = ["0", "-1", "1", "2", "1000", "1001", "4096", "4097", "nan", "-nan", "inf", "-inf", "1e999", "1e-999", "1.5",
        "-0", "0x10", "1_0", " 3 ", "", "99999999999999999999999", "9" * 5000, "4294967295", "4294967296", "1e3"]  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(EDGE),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=-3, max_value=300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=-5, max_value=200).map(repr),
)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def fresh(capsys, out_file):
    """Each example starts with empty captures and no output file."""
    capsys.readouterr()
    out_file.unlink(missing_ok=True)


def check_outcome(code, err, out_file):
    assert "Traceback" not in err
    if code == 0:
        assert out_file.exists()
    else:
        assert_one_line_refusal(code, err)
        assert not out_file.exists()


@SETTINGS
@given(option=st.sampled_from(["--steps", "--cfg", "--seed", "--per-class", "--batch-size", "--classes"]), value=VALUES)
def test_property_sample_options(tmp_path, capsys, monkeypatch, exported, option, value):
    """Budget shrunk to 64 KiB (256 samples) so that every accepted value samples in well under a second."""
    from ditq.runtime import generate

    monkeypatch.setattr(generate, "MAX_SAMPLE_BYTES", 1 << 16, raising=False)
    out_file = tmp_path / "x.npy"
    fresh(capsys, out_file)
    base = {"--steps": "2", "--per-class": "1", "--classes": "0"}
    base[option] = value
    argv = ["sample", str(exported), *[a for k, v in base.items() for a in (k, v)], "--out", str(out_file)]
    code, _, err = run(argv, capsys)
    check_outcome(code, err, out_file)
    if code == 0:
        x = np.load(out_file)
        assert np.isfinite(x).all() and x.shape[1:] == (1, 8, 8)


@SETTINGS
@given(option=st.sampled_from(["--wbits", "--abits", "--group-size", "--seed", "--num-heads"]), value=VALUES)
def test_property_recipe_options(tmp_path, capsys, option, value):
    out_file = tmp_path / "r.json"
    fresh(capsys, out_file)
    code, _, err = run(["recipe", option, value, "--out", str(out_file)], capsys)
    check_outcome(code, err, out_file)


@SETTINGS
@given(option=st.sampled_from(["--num-samples", "--steps", "--cfg", "--seeds", "--group-size", "--calib-samples", "--calib-timesteps"]),
       value=VALUES)  # fmt: skip
def test_property_eval_options(tmp_path, capsys, monkeypatch, option, value):
    """``evaluate`` replaced by a stub that checks what reaches it: every accepted value is in range."""
    from ditq.workflows import evaluate

    class Report:
        def table(self):
            return "table"

        def to_dict(self):
            return {"rows": []}

    def stub(model, configs, *, num_samples, steps, cfg, seeds, **_):
        assert 1 <= num_samples <= 100_000 and 1 <= steps <= 1000 and math.isfinite(cfg) and 0 <= cfg <= 100
        assert seeds and all(0 <= s < 2**32 for s in seeds)
        return Report()

    monkeypatch.setattr(evaluate, "evaluate", stub)
    out_file = tmp_path / "report.json"
    fresh(capsys, out_file)
    code, _, err = run(["eval", "--configs", "fp,w4a8", option, value, "--json", str(out_file)], capsys)
    check_outcome(code, err, out_file)
