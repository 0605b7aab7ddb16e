"""Q-DiT's group-size search and its fitness on a text-conditioned digits model (issue 16): samples drawn
from the model's training paraphrases (never the held-out ones ``ditq eval`` judges), flow-matching Euler
with guidance by the empty prompt, judged 2x2-pooled.

The reference for the fitness's float samples is the trainer's PyTorch sampler
(:func:`ditq.calib.train_t2i.sample_torch`, checked against diffusers' scheduler step for step in
tests/test_digits_t2i.py), fed the prompts written out here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ditq.calib.digits_prompts import held_out_prompts, train_prompts
from ditq.models import load_model
from ditq.workflows.fitness import FitnessConfig, fitness_conditioning

from .conftest import assert_one_line_refusal, run
from .t2i_fixtures import digits_t2i_like, sd3_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return digits_t2i_like(tmp_path_factory.mktemp("t2i-search"), seed=3)


def test_the_fitness_samples_training_paraphrases_of_digit_i_mod_10(tiny):
    cond = fitness_conditioning(load_model(str(tiny)), FitnessConfig(cfg=2.5))
    held = {p for d in range(10) for p in held_out_prompts(d)}
    assert cond.guidance == 2.5 and len(cond.prompts) >= 10
    for i, p in enumerate(cond.prompts):
        assert p in train_prompts(i % 10) and p not in held, (i, p)


def test_the_float_fitness_samples_are_the_trainer_s_torch_sampler_s(tiny):
    from ditq.calib.train_t2i import DigitsT2I, sample_torch
    from ditq.workflows import fitness as fit

    cfg = FitnessConfig(num_samples=12, steps=4, cfg=2.0, seed=5)
    fit._init(str(tiny), None, [], cfg.__dict__, 1)
    ours = fit._W["float"]
    loaded = load_model(str(tiny))
    from transformers import CLIPTextModelWithProjection

    import torch

    text = CLIPTextModelWithProjection.from_pretrained(str(tiny / "text_encoder"), torch_dtype=torch.float32).eval()
    prompts = [fit._W["text"].prompts[i % len(fit._W["text"].prompts)] for i in range(12)]
    theirs = sample_torch(DigitsT2I(loaded.model, text), prompts, steps=4, guidance=2.0, seed=5)
    # float32 torch in both, batched differently (the trainer's sampler clamps its final images to [-1, 1])
    np.testing.assert_allclose(np.clip(ours, -1, 1), theirs, rtol=0, atol=1e-4)
    metrics = fit.metrics_of(ours)
    assert metrics["rmse"] == 0.0 and metrics["fitness"] == metrics["fid"]


def test_search_on_a_text_model_journals_both_streams_and_writes_a_recipe_export_takes(tiny, tmp_path, capsys):
    journal, out = tmp_path / "j.jsonl", tmp_path / "r.json"
    argv = ["search", "--model", str(tiny), "--abits", "4", "--population", "3", "--generations", "1", "--top-k", "2",
            "--num-samples", "12", "--fitness-steps", "3", "--workers", "1", "--space", "32,64", "--budget", "g32", "--journal", str(journal),
            "--out", str(out)]  # fmt: skip
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    head, *records = [json.loads(ln) for ln in journal.read_text().splitlines()]
    assert len(records) == 3 and all(np.isfinite(r["fid"]) and r["rmse"] > 0 for r in records)
    recipe = json.loads(out.read_text())
    matched = {r["match"] for r in recipe["rules"] if "group_size" in r.get("set", r)}
    assert any("add_q_proj" in m for m in matched) and any("attn.to_q" in m for m in matched), sorted(matched)[:8]
    code, _, err = run(["export", "--model", str(tiny), "--recipe", str(out), "--out", str(tmp_path / "onnx")], capsys)
    assert code == 0, err


def test_fitness_and_search_refuse_a_text_model_no_judge_scores(tmp_path, capsys):
    plain = sd3_pipeline(tmp_path / "sd3")
    code, _, err = run(["fitness", "--model", str(plain), "--configs", "w8a8", "--seeds", "1", "--workers", "1"], capsys)
    assert_one_line_refusal(code, err, "no digits-t2i judge")
    code, _, err = run(["search", "--model", str(plain), "--journal", str(tmp_path / "j.jsonl"), "--out", str(tmp_path / "r.json")], capsys)
    assert_one_line_refusal(code, err, "no digits-t2i judge")
    assert not (tmp_path / "j.jsonl").exists() and not (tmp_path / "r.json").exists()
