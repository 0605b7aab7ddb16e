"""The full latent pipeline: a diffusers pipeline folder (DiT + VAE + scheduler) exported and sampled to
images with ONNX Runtime alone, checked against the same pipeline run by diffusers: its ``DDIMScheduler``
read from the folder, stepping as ``DiTPipeline`` does, and its ``AutoencoderKL`` decoding in PyTorch.

Bounds. Latents: diffusers' scheduler is handed the folder's schedule in float64 (written here), so both
samplers guide in float32 and step in float64, and feed the exported DiT the same float32 input at every
step (its int8 activation kernels turn a difference of one ulp in their input into another code, which
moves the latents by 7e-4 here, so the reference must not differ even by that); what is left is ditq's
float32 result against the float64 reference, half an ulp (6e-8 relative; measured 5.9e-8). Decoder:
float graph against PyTorch, fp32 reassociation only (measured 1.2e-6 on values up to 1.35). PNG: that
decoder error is 1.6e-4 of one 8-bit level, so a pixel differs by one level at most, and only where its
value lies that close to a rounding midpoint (measured: none).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditq.cli import main
from ditq.schedule import SchedulerSpec

from .conftest import grid_cells, tiny_config

LATENT_REL = 2e-7  # float32 rounding of the samples (module docstring)
DECODE_ATOL = 2e-5  # fp32 reassociation in the float VAE graph (module docstring)


def diffusers_dit_pipeline_latents(session, folder, noise, labels, *, steps, guidance, null_class):
    """``DiTPipeline.__call__``'s loop over an ONNX Runtime session of the exported DiT: the conditional and
    null-class batch together, guidance on the first C channels in float32 (the variance channels
    dropped), and ``DDIMScheduler.step`` of the folder's own scheduler config, given its schedule in float64
    and stepping in float64."""
    from diffusers import DDIMScheduler

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["beta_schedule"] == "scaled_linear"
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(steps)
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2  # fmt: skip
    np.testing.assert_allclose(torch.cumprod(1 - betas, 0).numpy(), sched.alphas_cumprod.numpy(), rtol=1e-6)
    sched.betas, sched.alphas, sched.alphas_cumprod = betas, 1 - betas, torch.cumprod(1 - betas, 0)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if config["set_alpha_to_one"] else sched.alphas_cumprod[0]
    n, c = noise.shape[:2]
    x = torch.from_numpy(noise.astype(np.float64))
    for t in sched.timesteps:
        xin = x.numpy().astype(np.float32)
        feeds = {"sample": np.concatenate([xin, xin]), "timestep": np.full(2 * n, int(t), np.int64),
                 "class_labels": np.concatenate([labels, np.full(n, null_class)]).astype(np.int64)}  # fmt: skip
        out = torch.from_numpy(session.run(None, feeds)[0][:, :c])
        eps = out[n:] + guidance * (out[:n] - out[n:])  # in the model's dtype (float32), as DiTPipeline guides
        x = sched.step(eps.double(), t, x).prev_sample
    return x.numpy()


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


@pytest.mark.slow
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
    assert model.pipeline.scaling_factor == 0.5 and model.pipeline.schedule.beta_schedule == "scaled_linear"
    np.testing.assert_allclose(model.schedule.betas[[0, -1]], [0.00085, 0.012])

    # the exported decoder is the VAE: ORT vs diffusers' AutoencoderKL in PyTorch on the same latents,
    # divided by the scaling factor as diffusers' pipelines do
    vae = AutoencoderKL.from_pretrained(pipeline_folder / "vae").eval()
    z = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample.numpy()
    got = model.decode(z)
    assert got.shape == want.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(got, want, rtol=0, atol=DECODE_ATOL)

    # `ditq sample` (ORT only: noise -> DDIM steps with guidance -> latents) writes what diffusers' DiT
    # pipeline loop makes from the same exported DiT, noise (seed 0) and the folder's scheduler
    import onnxruntime as ort

    npy = tmp_path / "lat.npy"
    assert main(["--quiet", "sample", str(out), "--classes", "0,3", "--per-class", "2", "--steps", "4", "--out", str(npy)]) == 0
    lat = np.load(npy)
    labels = np.array([0, 0, 3, 3])
    noise = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)  # seeded_noise's rule
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])  # target ort: no config
    ref = diffusers_dit_pipeline_latents(session, pipeline_folder, noise, labels, steps=4, guidance=1.5, null_class=10)
    assert lat.shape == ref.shape == (4, 4, 8, 8)
    assert np.abs(lat - ref).max() <= LATENT_REL * np.abs(ref).max(), np.abs(lat - ref).max()

    # the PNG grid of the same run holds the VAE decoding of those latents: diffusers' decode, mapped to
    # [0, 1] as DiTPipeline does ((x / 2 + 0.5).clamp(0, 1)), in 8 bits
    png = tmp_path / "grid.png"
    assert main(["--quiet", "sample", str(out), "--classes", "0,3", "--per-class", "2", "--steps", "4", "--out", str(png)]) == 0
    with torch.no_grad():
        imgs = (vae.decode(torch.from_numpy(lat) / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    want_px = np.round(imgs.numpy() * 255).astype(int).transpose(0, 2, 3, 1)  # [4, 16, 16, 3]
    diff = grid_cells(png, rows=2, cols=2, size=16).astype(int) - want_px
    assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= 0.01 * diff.size, (np.abs(diff).max(), np.count_nonzero(diff))

    assert main(["--quiet", "validate", str(out)]) == 0
