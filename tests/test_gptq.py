"""GPTQ on synthetic Hessians and small layers, against RTN."""

from __future__ import annotations

import pytest
import torch

from ditq.adapters import adapter_for
from ditq.calib.gptq import HessianState, accumulate_hessian, gptq_quantize, layer_output_error
from ditq.calib.numerics import qrange, quantize_rtn

DIT_ADAPTER = adapter_for("DiTTransformer2DModel")  # the family of the models here
DIT = DIT_ADAPTER.coverage


def test_hessian_accumulates_in_chunks_like_in_one_go():
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0))
    whole = accumulate_hessian(HessianState.zeros(16), x)
    parts = HessianState.zeros(16)
    for chunk in x.reshape(-1, 16).split(37):
        accumulate_hessian(parts, chunk)
    assert whole.n == parts.n == 150
    flat = x.reshape(-1, 16).double()
    torch.testing.assert_close(whole.h, 2 / 150 * flat.T @ flat)
    torch.testing.assert_close(parts.h, whole.h)


@pytest.mark.parametrize("bits,group,sym", [(4, 8, False), (3, 16, True), (8, None, False)])
def test_identity_hessian_gives_exactly_rtn(bits, group, sym):
    """With uncorrelated inputs there is no error to push onto other columns: GPTQ must reduce to RTN."""
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    res = gptq_quantize(w, torch.eye(32, dtype=torch.float64), bits, group, sym)
    rtn = quantize_rtn(w, bits, group or 32, sym)
    assert torch.equal(res.weight.codes, rtn.codes)
    torch.testing.assert_close(res.weight.scale, rtn.scale)
    assert torch.equal(res.weight.zero, rtn.zero)


@pytest.mark.parametrize("bits,group", [(4, 16), (3, 32), (4, None)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group):
    """Inputs with strongly correlated channels: GPTQ's output error must be clearly below RTN's on held-out
    inputs from the same distribution, and its codes must stay in range."""
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    x_cal = torch.randn(2048, 64, generator=g) @ mix
    x_test = torch.randn(1024, 64, generator=g) @ mix
    w = torch.randn(48, 64, generator=g)
    res = gptq_quantize(w, accumulate_hessian(HessianState.zeros(64), x_cal).h, bits, group)
    rtn = quantize_rtn(w, bits, group or 64)
    e_gptq, e_rtn = layer_output_error(w, res.weight, x_test), layer_output_error(w, rtn, x_test)
    assert e_gptq < 0.85 * e_rtn
    lo, hi = qrange(bits, False)
    assert int(res.weight.codes.min()) >= lo and int(res.weight.codes.max()) <= hi
    assert res.loss > 0


def test_dead_channels_and_bad_shapes():
    h = torch.eye(8, dtype=torch.float64)
    h[3, 3] = 0  # a channel never active: its weight is zeroed, the rest still quantizes
    res = gptq_quantize(torch.randn(4, 8), h, 4, 4)
    assert res.weight.dequantize()[:, 3].abs().max() == 0
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, 3)
    with pytest.raises(ValueError, match="does not fit"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), 4, 4)


@pytest.mark.slow
def test_gptq_recipe_on_a_dit_lowers_layer_error_and_exports_valid(tiny_dit, tmp_path):
    """Calibrate on one set of trajectories, measure on another: the block linears' output error is lower
    with GPTQ than with RTN on average, and the exported GPTQ graph computes what its reference computes."""
    from dataclasses import replace

    from ditq.calib.calibration import CalibConfig, record_activations
    from ditq.exporter.export import export
    from ditq.exporter.reference import quantize_model
    from ditq.recipe import Recipe
    from ditq.calib.numerics import sqnr_db
    from ditq.adapters.dit import TorchDiT
    from ditq.runtime.session import OrtDiT
    from ditq.workflows.validate import validate

    recipe = Recipe.qdit(DIT, 3, 8, 16)
    plans = recipe.resolve(tiny_dit)
    linears = [n for n, p in plans.items() if p.kind == "linear"]
    cc = CalibConfig(num_samples=8, steps=10, timesteps_per_sample=4, tokens_per_call=8, seed=0)
    cal = record_activations(tiny_dit, linears, cc, clip_denoised=False, progress=False)
    held = record_activations(tiny_dit, linears, replace(cc, seed=1), clip_denoised=False, progress=False)
    assert cal["transformer_blocks.0.attn1.to_q"].shape == (8 * 4 * 8 * 2, 64)  # samples x times x tokens x (cond, null)
    rtn = quantize_model(tiny_dit, recipe, progress=False)
    gq = quantize_model(tiny_dit, replace(recipe, method="gptq"), progress=False, calibration=cal)
    named = dict(tiny_dit.named_modules())
    block = [n for n in linears if n.startswith("transformer_blocks.")]
    e_rtn = sum(layer_output_error(named[n].weight, rtn.weights[n], held[n]) for n in block) / len(block)
    e_gptq = sum(layer_output_error(named[n].weight, gq.weights[n], held[n]) for n in block) / len(block)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    # the exported graph computes what the GPTQ reference computes (criterion of `ditq validate`)
    res = export(gq, tmp_path / "gptq", source={"kind": "api"}, progress=False)
    x, t, y = DIT_ADAPTER.example_inputs(dict(tiny_dit.config), batch=3, seed=5)
    args = (x.numpy(), t.numpy(), y.numpy())
    out_ort, out_ref, out_fp = OrtDiT(res.model_path)(*args), TorchDiT(gq.reference())(*args), TorchDiT(tiny_dit)(*args)
    assert sqnr_db(out_ref, out_ort) >= sqnr_db(out_fp, out_ref)
    # and `validate` proves it, taking the GPTQ codes from the graph (they cannot be recomputed)
    tiny_dit.save_pretrained(tmp_path / "tiny")
    report = validate(res.out_dir, model_spec=str(tmp_path / "tiny"), progress=False)
    assert report.passed, report.table()
    assert "stored codes and scales equal the reference's" not in [c.name for c in report.checks]
