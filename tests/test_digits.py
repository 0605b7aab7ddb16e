"""The shipped digits model end to end: load, export, `ditq sample` without torch, `ditq eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ditq.adapters import adapter_for
from ditq.cli import main
from ditq.models import digits_config, load_model

from .conftest import grid_cells

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


@pytest.fixture(scope="module")
def digits_w4a8(tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "digits-w4a8"
    assert main(["--quiet", "export", "--model", "digits", "--wbits", "4", "--abits", "8", "--group-size", "64", "--out", str(out)]) == 0
    return out


def test_shipped_digits_weights_load_with_their_config():
    loaded = load_model("digits")
    cfg = dict(loaded.model.config)
    for k, v in digits_config().items():
        assert cfg[k] == v, k
    assert loaded.source["kind"] == "builtin" and len(loaded.source["sha256"]) == 64
    n = sum(p.numel() for p in loaded.model.parameters())
    assert 4_000_000 < n < 5_000_000


def test_shipped_model_draws_digits_the_judge_recognises():
    """The float model through the PyTorch callable: 10 samples per class, DDIM-25, guidance 1.5. The
    bound (80%) sits below the 500-sample, 50-step accuracy in the model card with room for 100 samples'
    sampling noise (binomial std about 3 points)."""
    from ditq.calib.digits import to_unit_range
    from ditq.adapters.dit import TorchDiT
    from ditq.runtime.metrics import DigitJudge
    from ditq.runtime.samplers import sample, seeded_noise

    labels = np.arange(100) % 10
    x = sample(TorchDiT(load_model("digits").model), seeded_noise(123, 100, 1, 8), labels, steps=25, cfg=1.5,
               null_class=10, clip_denoised=True)  # fmt: skip
    assert DigitJudge.load().accuracy(to_unit_range(x), labels) >= 0.8


def _run_without_torch(args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter where importing torch fails, then check it was never imported."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from ditq.cli import main
        rc = main({args!r})
        assert not any(m == "torch" or m.startswith("torch.") for m, v in sys.modules.items() if v is not None)
        sys.exit(rc)
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_sample_runs_with_onnxruntime_alone_and_writes_a_labelled_grid(digits_w4a8, tmp_path):
    from PIL import Image

    grid = tmp_path / "grid.png"
    r = _run_without_torch(["--quiet", "sample", str(digits_w4a8), "--classes", "1,7,3", "--per-class", "4", "--steps", "10", "--out", str(grid)])
    assert r.returncode == 0, r.stderr
    assert "digit judge recognises" in r.stdout
    img = Image.open(grid)
    # 3 rows and 4 columns of 64-pixel cells with 2-pixel gaps, plus a label margin on the left
    assert img.size[1] == 3 * 66 + 2 and (img.size[0] - 2) % 66 > 0 and (img.size[0] - 2) // 66 == 4
    # the cells are the samples of the same seed (the .npy of the same run), row i of class i of --classes,
    # as grey 8-bit pixels of [-1, 1] -> [0, 255]; float32 vs float64 evaluation of that map may move a
    # value on a rounding midpoint by one level (none measured)
    npy = tmp_path / "s.npy"
    assert main(["--quiet", "sample", str(digits_w4a8), "--classes", "1,7,3", "--per-class", "4", "--steps", "10", "--out", str(npy)]) == 0
    want = np.round(np.clip((np.load(npy).astype(np.float64) + 1) / 2, 0, 1) * 255)[:, 0]  # [12, 8, 8]
    cells = grid_cells(grid, rows=3, cols=4, size=8).astype(np.float64)
    assert np.array_equal(cells[..., 0], cells[..., 1]) and np.array_equal(cells[..., 0], cells[..., 2])  # grey
    diff = cells[..., 0] - want
    assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= 0.01 * diff.size, (np.abs(diff).max(), np.count_nonzero(diff))


def test_sample_is_seeded(digits_w4a8, tmp_path):
    outs = []
    for i, seed in enumerate((5, 5, 6)):
        f = tmp_path / f"s{i}.npy"
        assert main(["--quiet", "sample", str(digits_w4a8), "--classes", "2", "--per-class", "3", "--steps", "5", "--seed", str(seed), "--out", str(f)]) == 0
        outs.append(np.load(f))
    assert outs[0].shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--classes", "3,12"], "--classes: expected integers in 0..9, got '12'"),
        (["--classes", "a,b"], "comma-separated integers"),
        (["--out", "grid.jpg"], "expected a .png grid or a .npy"),
        (["--per-class", "0"], "argument --per-class: expected an integer in 1.."),
    ],
)
def test_sample_bad_input_is_one_line(digits_w4a8, tmp_path, capsys, args, msg):
    argv = ["sample", str(digits_w4a8), "--steps", "2", "--out", str(tmp_path / "g.png"), *args]
    if "--out" in args:
        argv = ["sample", str(digits_w4a8), "--steps", "2", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_sample_of_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png")]) == 2
    assert "no exported model" in capsys.readouterr().err


@pytest.mark.slow  # five configurations sampled on digits: about 25 s (the fast lane runs eval in test_calibration_schedule.py)
def test_eval_reports_every_config_on_the_same_seeds(tmp_path):
    """A scaled-down eval: the float export reproduces the PyTorch float model's first step (>= 60 dB:
    fp32 reassociation only), W4A8 is measurably worse at the first step and in its samples, its file is
    under a fifth of the float file, and the JSON carries the documented keys."""
    from PIL import Image

    report, grid = tmp_path / "r.json", tmp_path / "g.png"
    argv = ["--quiet", "eval", "--configs", "fp,w4a8", "--num-samples", "20", "--steps", "4", "--seeds", "0,1",
            "--json", str(report), "--grid", str(grid)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(report.read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["fp", "w4a8"]
    for r in rows.values():
        assert {"config", "fid", "class_accuracy", "sqnr_db", "file_bytes"} <= set(r)
        assert [p["seed"] for p in r["per_seed"]] == [0, 1]
        assert r["fid"] >= 0 and 0 <= r["class_accuracy"] <= 1
    assert rows["fp"]["sqnr_db"] >= 60 and rows["w4a8"]["sqnr_db"] < rows["fp"]["sqnr_db"] - 20
    assert rows["fp"]["sample_rmse"] == 0.0 and rows["w4a8"]["sample_rmse"] > 0
    assert rows["w4a8"]["file_bytes"] < 0.2 * rows["fp"]["file_bytes"]
    assert data["noise_floor_fid"] > 0
    assert Image.open(grid).size[1] == 16 + 2 * 66 + 2  # column labels + one row per config


def test_eval_bad_config_is_one_line(capsys):
    assert main(["eval", "--configs", "fp,w9a8"]) == 2
    assert "cannot read 'w9a8'" in capsys.readouterr().err


@pytest.mark.slow  # samples the digits model twice with ONNX Runtime: about 23 s
def test_eval_takes_any_feature_extractor():
    """The Frechet distance runs in the space it is given: raw pixels here, against a user's real set."""
    from ditq.calib.digits import load_split, to_unit_range
    from ditq.workflows.evaluate import evaluate, parse_configs

    calls = []

    def pixels(images):
        calls.append(images.copy())
        return images.reshape(len(images), -1)

    def frechet(a, b):
        """The Frechet distance of two pixel sets, written here: tr((S1 S2)^(1/2)) as the sum of the square
        roots of the eigenvalues of S1 S2 (real and >= 0; those of these rank-deficient covariances are 0
        up to round-off, about 1e-15 of the largest, whose roots add up to about 1e-6)."""
        fa, fb = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
        root_trace = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
        return float(np.sum((fa.mean(0) - fb.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * root_trace)

    real = to_unit_range(load_split().x_test[:200])
    rep = evaluate("digits", parse_configs("fp", 64), num_samples=20, steps=3, features=pixels, real_images=real, progress=False)
    assert [len(c) for c in calls] == [200, 20, 100, 100]  # the real set, the samples, the noise floor's halves
    np.testing.assert_array_equal(calls[0], real)
    assert calls[1].shape == (20, 1, 8, 8) and calls[1].min() >= 0 and calls[1].max() <= 1
    assert rep.rows[0].fid == pytest.approx(frechet(calls[1], real), rel=1e-5)
    assert rep.noise_floor_fid == pytest.approx(frechet(calls[2], calls[3]), rel=1e-5)
    assert rep.rows[0].class_accuracy is not None
    assert rep.settings["real_images"] == 200


def test_sample_of_a_latent_model_writes_npy_and_refuses_png(tiny_dit, tmp_path, capsys):
    from ditq.exporter.export import export
    from ditq.exporter.reference import quantize_model
    from ditq.recipe import Recipe

    res = export(quantize_model(tiny_dit, Recipe.qdit(DIT, 8, 8, 32), progress=False), tmp_path / "m", source={"kind": "api"}, progress=False)
    assert main(["sample", str(res.out_dir), "--out", str(tmp_path / "g.png")]) == 2
    assert "samples latents" in capsys.readouterr().err
    out = tmp_path / "x.npy"
    argv = ["--quiet", "sample", str(res.out_dir), "--classes", "0,9", "--per-class", "2", "--steps", "3", "--sampler", "ddpm", "--out", str(out)]
    assert main(argv) == 0
    x = np.load(out)
    assert x.shape == (4, 4, 8, 8) and np.isfinite(x).all()
