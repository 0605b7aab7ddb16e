"""One sampling loop drives PyTorch and ONNX Runtime: same noise, few steps, trajectories compared."""

from __future__ import annotations

import numpy as np
import pytest

from ditq.adapters import adapter_for
from ditq.adapters.dit import TorchDiT
from ditq.calib.numerics import sqnr_db
from ditq.exporter.export import export
from ditq.exporter.reference import quantize_model
from ditq.recipe import LayerQuant, Recipe
from ditq.runtime.samplers import sample, seeded_noise
from ditq.runtime.session import OrtDiT

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


def _trajectory(fn, method: str) -> list:
    traj: list = []
    labels = np.array([0, 3, 9])
    sample(fn, seeded_noise(7, 3, 4, 8), labels, steps=4, method=method, cfg=2.0, null_class=10, seed=11, trajectory=traj)
    return traj


def _sqnr(ref, x) -> float:
    import torch

    return float(sqnr_db(torch.from_numpy(ref), torch.from_numpy(x)))


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_float_export_follows_the_pytorch_trajectory(tiny_dit, tmp_path, method):
    """Float graph: only fp32 reassociation differs, so every step's model output (guided eps and the
    learned-variance channels) and every x_prev agree to at least 80 dB (measured: above 110 dB)."""
    qdit = quantize_model(tiny_dit, Recipe(LayerQuant(None, None, None), ()), progress=False)
    res = export(qdit, tmp_path / "fp", source={"kind": "api"}, progress=False)
    ort_traj = _trajectory(OrtDiT(res.model_path), method)
    pt_traj = _trajectory(TorchDiT(tiny_dit), method)
    assert [t for t, _, _ in ort_traj] == [t for t, _, _ in pt_traj] == [750, 500, 250, 0]
    for (_, o_out, o_x), (_, p_out, p_x) in zip(ort_traj, pt_traj):
        assert o_out.shape == (3, 8, 8, 8)  # 4 eps + 4 learned-variance channels
        assert _sqnr(p_out, o_out) >= 80 and _sqnr(p_x, o_x) >= 80


def test_w4a8_export_follows_the_reference_trajectory(tiny_dit, tmp_path):
    """W4A8: ORT and the PyTorch reference make the same activation codes except where fp32 rounding
    lands on a tie (one step of one code), so at every step ORT is at least as close to the reference as
    the reference is to the float model (the criterion of ``ditq validate``), and far from it would fail."""
    qdit = quantize_model(tiny_dit, Recipe.qdit(DIT, 4, 8, 32), progress=False)
    res = export(qdit, tmp_path / "w4a8", source={"kind": "api"}, progress=False)
    ort_traj = _trajectory(OrtDiT(res.model_path), "ddpm")
    ref_traj = _trajectory(TorchDiT(qdit.reference()), "ddpm")
    fp_traj = _trajectory(TorchDiT(tiny_dit), "ddpm")
    for (_, o, ox), (_, r, rx), (_, f, fx) in zip(ort_traj, ref_traj, fp_traj):
        quant_err = _sqnr(f, r)
        assert quant_err < 60  # the quantization is really there
        assert _sqnr(r, o) >= quant_err
        assert _sqnr(rx, ox) >= _sqnr(fx, rx)
