"""RobuQ's mixed activation bits (``--mixed``) on any DiT: the sensitivity inputs are the model's own
sampling inputs, so a latent-space model (4 channels, its own size and classes) gets a recipe too."""

from __future__ import annotations

import pytest

from ditq.calib.robuq import SENSITIVITY_TRAJECTORIES, block_units, sensitivity_inputs
from ditq.cli import main
from ditq.recipe import Recipe
from ditq.schedule import NoiseSchedule
from tests.conftest import assert_one_line_refusal, run

BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")


def _check_mixed_recipe(path, model, avg_bits: int) -> None:
    recipe = Recipe.load(path)
    per_module = {r.match: r.values["abits"] for r in recipe.rules if set(r.values) == {"abits"}}
    names = [f"transformer_blocks.{i}.{m}" for i in range(model.config.num_layers) for m in BLOCK_LINEARS]
    assert sorted(per_module) == sorted(names)  # one rule per block linear, named exactly
    assert sum(per_module.values()) == avg_bits * len(names)  # the average is exactly the budget
    assert set(per_module.values()) <= set(range(max(1, avg_bits - 1), min(8, avg_bits + 2) + 1))
    for i in range(model.config.num_layers):  # q/k/v read one tensor: one quantizer, one width
        assert len({per_module[f"transformer_blocks.{i}.attn1.to_{c}"] for c in "qkv"}) == 1
    plans = recipe.resolve(model)
    assert all(plans[n].abits == b for n, b in per_module.items())


def test_recipe_mixed_on_a_latent_dit_folder_writes_activation_bits_per_module(tmp_path, tiny_dit, capsys):
    tiny_dit.save_pretrained(tmp_path / "dit")  # a diffusers folder: 4 channels, 8x8 latents, 10 classes
    out = tmp_path / "recipe.json"
    code = main(["--quiet", "recipe", "--model", str(tmp_path / "dit"), "--wbits", "1.58", "--abits", "4", "--mixed", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "activation bits per unit" in err
    _check_mixed_recipe(out, tiny_dit, 4)


@pytest.mark.slow  # the digits DiT's 24 units x 4 widths: about half a minute alone on 2 cores
def test_recipe_mixed_on_digits_still_works(tmp_path, capsys):
    abits = 2
    from ditq.models import load_model

    out = tmp_path / "recipe.json"
    code = main(["--quiet", "recipe", "--model", "digits", "--wbits", "1.58", "--abits", str(abits), "--mixed", "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    _check_mixed_recipe(out, load_model("digits").model, abits)


def test_recipe_mixed_without_a_model_is_one_line(capsys):
    code, out, err = run(["recipe", "--wbits", "1.58", "--abits", "4", "--mixed"], capsys)
    assert out == ""
    assert_one_line_refusal(code, err, "--model")


def test_sensitivity_inputs_are_the_models_own_sampling_inputs(tiny_dit):
    x, t, y = sensitivity_inputs(tiny_dit, clip_denoised=False, n=64)
    assert tuple(x.shape) == (64, 4, 8, 8) and len(t) == len(y) == 64
    # DDIM-50 timesteps of the 1000-step schedule, and labels of the model's classes or its null class
    assert set(t.tolist()) <= set(NoiseSchedule.linear().timesteps(SENSITIVITY_TRAJECTORIES.steps).tolist())
    assert set(y.tolist()) <= set(range(11))
    assert len(set(t.tolist())) > 1  # spread over the trajectory
    assert len(block_units(tiny_dit)) == 4 * tiny_dit.config.num_layers
