"""``ditq eval`` on text-to-image models (issue 16): the ``digits-t2i`` models sampled in ONNX Runtime from
held-out paraphrases, judged by the digit judge on 2x2-pooled samples.

The reference for the report's float row is independent of ditq's sampler: the trainer's PyTorch sampler
(:func:`ditq.calib.train_t2i.sample_torch`, flow-matching Euler over diffusers' ``SD3Transformer2DModel`` and
transformers' CLIP, itself checked step for step against diffusers' scheduler in tests/test_digits_t2i.py)
on prompts written out here from :func:`~ditq.calib.digits_prompts.held_out_prompts`, judged here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditq.calib.digits import load_split, to_unit_range
from ditq.calib.digits_prompts import held_out_prompts, train_prompts
from ditq.models import BUILTIN
from ditq.runtime.metrics import DigitJudge, fid, pool_to

from .conftest import assert_one_line_refusal, run
from .t2i_fixtures import digits_t2i_like, sd3_pipeline

SHIPPED = BUILTIN["digits-t2i"]
FLOAT_RECIPE = {"format": "ditq-recipe", "version": 1, "method": "rtn",
                "default": {"wbits": None, "abits": None, "group_size": None, "symmetric": False}, "rules": []}  # fmt: skip


def _held_out_order(n: int) -> list[str]:
    """Sample i: digit i mod 10, its (i // 10)-th held-out paraphrase, cycling (written out independently)."""
    out = []
    for i in range(n):
        d = i % 10
        ps = held_out_prompts(d)
        out.append(ps[(i // 10) % len(ps)])
    return out


def test_pooling_undoes_the_trainer_s_upsampling_exactly_and_refuses_a_partial_block():
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    up = np.repeat(np.repeat(x, 2, axis=-1), 2, axis=-2)
    assert np.array_equal(pool_to(up, 8), x)
    blocks = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    assert pool_to(blocks, 2)[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]  # means of 2x2 blocks, written out
    from ditq.errors import DitqError

    with pytest.raises(DitqError, match="cannot pool 10x10"):
        pool_to(np.zeros((1, 1, 10, 10), np.float32), 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random digits-t2i-like pipeline folder and its float export."""
    root = tmp_path_factory.mktemp("t2i-eval")
    folder = digits_t2i_like(root, seed=1)
    (root / "float.json").write_text(json.dumps(FLOAT_RECIPE))
    from ditq.cli import main

    assert main(["--quiet", "export", "--model", str(folder), "--recipe", str(root / "float.json"), "--out", str(root / "fp")]) == 0
    return folder, root / "fp"


def test_sampling_a_list_of_prompts_starts_row_k_from_the_noise_of_sample_k(tiny):
    from ditq.runtime.text2image import TextToImageModel

    model = TextToImageModel.open(tiny[1])
    prompts = ["a handwritten 3", "seven", "a handwritten 3", "zero"]
    many = model.generate_prompts(prompts, seed=5, steps=3, guidance=2.0)
    one = model.generate("a handwritten 3", n=4, seed=5, steps=3, guidance=2.0, batch_size=4)
    assert many.shape == one.shape == (4, 1, 16, 16)
    # same noise row, same prompt, same batch size: the same arithmetic row for row
    np.testing.assert_allclose(many[[0, 2]], one[[0, 2]], rtol=0, atol=1e-6)
    assert np.abs(many[1] - one[1]).max() > 1e-3  # another prompt draws something else from the same noise


def test_eval_of_a_text_model_reports_its_held_out_prompts_and_a_lossless_float_row(tiny, tmp_path, capsys):
    out = tmp_path / "e.json"
    code, stdout, err = run(["eval", "--model", str(tiny[0]), "--configs", "fp,w8a8", "--num-samples", "20", "--steps", "3",
                             "--cfg", "2", "--json", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    rep = json.loads(out.read_text())
    s = rep["settings"]
    assert s["prompts"] == "held-out paraphrases" and s["distinct_prompts"] == len(set(_held_out_order(20))) == 20
    assert s["sampler"] == "euler" and s["first_step_timestep"] == pytest.approx(1000.0)  # sigma 1 at shift 1
    fp, w8 = rep["rows"]
    assert fp["config"] == "fp" and fp["sample_rmse"] == 0.0
    assert fp["sqnr_db"] > 100  # the float ONNX transformer against the float torch model: rounding only
    assert 25 < w8["sqnr_db"] < 90 and w8["sample_rmse"] > 0  # 8-bit codes: quantization noise, far above rounding


def test_eval_refuses_a_text_model_without_a_judge_and_a_flow_model_with_a_ddpm_sampler(tiny, tmp_path, capsys):
    plain = sd3_pipeline(tmp_path / "sd3")  # a diffusers SD3 folder: latents, no judge
    code, _, err = run(["eval", "--model", str(plain), "--configs", "fp", "--num-samples", "4"], capsys)
    assert_one_line_refusal(code, err, str(plain))
    code, _, err = run(["eval", "--model", str(tiny[0]), "--configs", "fp", "--num-samples", "4", "--sampler", "ddim"], capsys)
    assert_one_line_refusal(code, err, "--sampler ddim", "flow-matching")


@pytest.mark.slow  # exports the shipped model twice and samples 100 images (about 1 min)
def test_eval_of_the_shipped_digits_t2i_matches_a_torch_sampler_judged_here(tmp_path, capsys):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from ditq.calib.train_t2i import DigitsT2I, sample_torch

    n, steps, guidance = 100, 12, 1.0
    out = tmp_path / "e.json"
    code, _, err = run(["eval", "--model", "digits-t2i", "--configs", "fp,w4a8", "--num-samples", str(n), "--steps", str(steps),
                        "--cfg", str(guidance), "--json", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}

    model = DigitsT2I(SD3Transformer2DModel.from_pretrained(str(SHIPPED / "transformer"), torch_dtype=torch.float32).eval(),
                      CLIPTextModelWithProjection.from_pretrained(str(SHIPPED / "text_encoder"), torch_dtype=torch.float32).eval())  # fmt: skip
    prompts = _held_out_order(n)
    assert not set(prompts) & {p for d in range(10) for p in train_prompts(d)}
    x = sample_torch(model, prompts, steps=steps, guidance=guidance, seed=0)
    imgs = pool_to((x + 1) / 2, 8)
    judge = DigitJudge.load()
    labels = np.arange(n) % 10
    acc = judge.accuracy(imgs, labels)
    f = fid(judge.features(imgs), judge.features(to_unit_range(load_split().x_test)))
    # float32 ONNX Runtime against float32 torch over 12 steps: a borderline digit may flip (1 in 100), FID moves by rounding
    assert abs(rows["fp"]["class_accuracy"] - acc) <= 1 / n
    assert rows["fp"]["fid"] == pytest.approx(f, rel=0.02, abs=0.02)
    assert acc >= 0.9  # the shipped model draws the prompted digit from held-out paraphrases (97% at 500 samples, 28 steps)
    assert rows["w4a8"]["sqnr_db"] < rows["fp"]["sqnr_db"] and rows["w4a8"]["class_accuracy"] >= 0.8
