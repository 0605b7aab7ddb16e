"""The full latent pipeline: a diffusers pipeline folder (DiT + VAE + scheduler) exported and sampled to
images with ONNX Runtime alone, checked against the same pipeline run in PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditq.cli import main
from ditq.schedule import SchedulerSpec

from .conftest import tiny_config


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A small random-init DiTPipeline folder: DiT on 8x8x4 latents, a VAE that upsamples by 2, and a
    DDIM scheduler config with a scaled-linear schedule (so the schedule really comes from the folder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from ditq.models import build_dit

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    ).eval()  # fmt: skip
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    folder = tmp_path_factory.mktemp("pipe") / "tiny-dit-pipeline"
    DiTPipeline(transformer=build_dit(tiny_config(), seed=3), vae=vae, scheduler=sched).save_pretrained(folder)
    return folder


def test_schedule_from_a_scheduler_config():
    s = SchedulerSpec.from_scheduler_config({"_class_name": "DDIMScheduler", "num_train_timesteps": 10, "beta_start": 0.01,
                                             "beta_end": 0.04, "beta_schedule": "scaled_linear"})  # fmt: skip
    np.testing.assert_allclose(s.betas[[0, -1]], [0.01, 0.04])
    np.testing.assert_allclose(np.sqrt(s.betas), np.linspace(0.1, 0.2, 10))


def test_latent_pipeline_end_to_end(tmp_path, pipeline_folder, capsys):
    from diffusers import AutoencoderKL

    from ditq.runtime.generate import ExportedDiT

    out = tmp_path / "m"
    assert main(["--quiet", "export", "--model", str(pipeline_folder), "--wbits", "4", "--abits", "8",
                 "--group-size", "32", "--target", "ort", "--out", str(out)]) == 0  # fmt: skip
    assert (out / "model.onnx").is_file() and (out / "vae_decoder.onnx").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "vae_decoder.onnx" in manifest["files"]

    model = ExportedDiT.open(out)
    assert model.pipeline["scaling_factor"] == 0.5 and model.pipeline["schedule"]["beta_schedule"] == "scaled_linear"
    np.testing.assert_allclose(model.schedule.betas[[0, -1]], [0.00085, 0.012])

    # the exported decoder is the VAE: ORT vs PyTorch on the same latents (float graph: fp32 reassociation only)
    vae = AutoencoderKL.from_pretrained(pipeline_folder / "vae").eval()
    z = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(z) / 0.5).sample.numpy()
    got = model.decode(z)
    assert got.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    # ditq sample runs the whole pipeline (noise -> DiT steps -> VAE) to a PNG grid, ORT only
    png = tmp_path / "grid.png"
    assert main(["--quiet", "sample", str(out), "--classes", "0,3", "--per-class", "2", "--steps", "4", "--out", str(png)]) == 0
    from PIL import Image

    img = np.asarray(Image.open(png))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 1.0  # an RGB grid with content

    # and its images are the VAE decoding of the latents `ditq sample` writes for the same seed
    npy = tmp_path / "lat.npy"
    assert main(["--quiet", "sample", str(out), "--classes", "0,3", "--per-class", "2", "--steps", "4", "--out", str(npy)]) == 0
    lat = np.load(npy)
    assert lat.shape == (4, 4, 8, 8) and np.isfinite(lat).all()
    with torch.no_grad():
        imgs = vae.decode(torch.from_numpy(lat) / 0.5).sample.numpy()
    assert imgs.shape == (4, 3, 16, 16)

    assert main(["--quiet", "validate", str(out)]) == 0
