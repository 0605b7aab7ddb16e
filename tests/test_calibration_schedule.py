"""Calibration, sensitivity and fitness trajectories follow the model's own scheduler (a ``v_prediction``
pipeline is not sampled as epsilon), checked against diffusers' ``DDIMScheduler`` configured from the same
scheduler config; the calibration cache is keyed by the schedule; one reader checks every pipeline record."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from ditq.calib.calibration import CalibConfig, load_or_record, sample_trajectories
from ditq.cli import main
from ditq.errors import DitqError
from ditq.models import build_dit, dit_config, load_model, pipeline_info
from ditq.pipeline import ClassConditioning, Pipeline

from .conftest import tiny_config

# a v_prediction DDIM config whose every sampling setting differs from DiT's: schedule, spacing, offset
V_SCHED = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1, clip_sample=False)  # fmt: skip


def _pipeline_folder(root, sched_kwargs, transformer_config, scheduler="DDIMScheduler"):
    """A diffusers pipeline folder (model_index.json, transformer/, scheduler/) without a VAE."""
    import diffusers

    build_dit(transformer_config, seed=3).save_pretrained(root / "transformer")
    getattr(diffusers, scheduler)(**sched_kwargs).save_config(root / "scheduler")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
             "scheduler": ["diffusers", scheduler]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    return _pipeline_folder(tmp_path_factory.mktemp("vpred") / "pipe", V_SCHED, tiny_config())


def reference_ddim(model, folder, noise, labels, *, steps, guidance, null_class):
    """DDIM (eta 0) with diffusers' DDIMScheduler read from ``folder``'s scheduler config; classifier-free
    guidance on the predicted channels. Returns ``[(timestep, x_t)]`` for every model evaluation, and the
    final sample."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    sched.set_timesteps(steps)
    x, n, c = torch.from_numpy(noise), len(labels), noise.shape[1]
    y = torch.from_numpy(np.concatenate([labels, np.full(n, null_class)]))
    seen = []
    with torch.no_grad():
        for t in sched.timesteps:
            seen.append((int(t), x.numpy().copy()))
            out = model(torch.cat([x, x]), timestep=t.repeat(2 * n), class_labels=y).sample[:, :c]
            pred = out[n:] + guidance * (out[:n] - out[n:])
            x = sched.step(pred, t, x, eta=0.0).prev_sample
    return seen, x.numpy()


def _record(loaded, cfg, schedule):
    calls = []
    sample_trajectories(loaded.model, cfg, lambda kept, x, t, y: calls.append((kept, x.copy(), t.copy(), y.copy())),
                        schedule=schedule, clip_denoised=loaded.pipeline.clip_denoised, progress=False)  # fmt: skip
    return calls


def test_calibration_trajectories_are_the_models_own_v_prediction_ddim(v_folder):
    loaded = load_model(str(v_folder))
    assert loaded.schedule.prediction_type == "v_prediction" and loaded.pipeline.clip_denoised is False
    cfg = CalibConfig(num_samples=3, steps=6, timesteps_per_sample=3, cfg=1.5, seed=5)
    calls = _record(loaded, cfg, loaded.schedule)
    noise = np.random.default_rng(cfg.seed).standard_normal((3, 4, 8, 8)).astype(np.float32)  # seeded_noise's rule
    labels = np.arange(3) % 10
    seen, _ = reference_ddim(loaded.model, v_folder, noise, labels, steps=6, guidance=1.5, null_class=10)
    assert [t for t, _ in seen] == [831, 665, 499, 333, 167, 1]  # leading, steps_offset 1 (DiT's: 999 ... 0)
    assert len(calls) == len(seen)
    for (kept, x, t, y), (t_ref, x_ref) in zip(calls, seen):
        np.testing.assert_array_equal(t, np.full(6, t_ref))
        np.testing.assert_array_equal(y, np.concatenate([labels, np.full(3, 10)]))
        np.testing.assert_array_equal(x[:3], x[3:])  # the guided batch: the same x_t twice
        # float64 (ditq) vs float32 (diffusers) arithmetic of the same steps: measured <= 1.1e-6 on values up to 3.3
        np.testing.assert_allclose(x[:3], x_ref, rtol=0, atol=2e-5)
    assert [k for k, *_ in calls] == [True, False, True, False, False, True]  # 3 of 6, first and last included

    # the epsilon reading of the same schedule (the old behaviour's prediction type) is far from it
    eps = _record(loaded, cfg, replace(loaded.schedule, prediction_type="epsilon"))
    assert [int(c[2][0]) for c in eps] == [t for t, _ in seen]
    assert np.abs(eps[-1][1][:3] - seen[-1][1]).max() > 0.1


def test_calibration_cache_is_keyed_by_the_schedule(v_folder, tmp_path):
    """A set recorded with another schedule, or by a ditq that did not record it, is recorded again."""
    from safetensors.torch import save_file

    loaded = load_model(str(v_folder))
    names = ["transformer_blocks.0.attn1.to_q"]
    cfg = CalibConfig(num_samples=2, steps=4, timesteps_per_sample=2, tokens_per_call=4, seed=0)
    path = tmp_path / "calib.safetensors"
    kw = dict(model_digest="m", clip_denoised=False, progress=False)
    v = load_or_record(path, loaded.model, names, cfg, schedule=loaded.schedule, **kw)[names[0]]
    dit = load_or_record(path, loaded.model, names, cfg, schedule=None, **kw)[names[0]]
    assert v.shape == dit.shape and not torch.allclose(v, dit, atol=1e-3)
    again = load_or_record(path, loaded.model, names, cfg, schedule=loaded.schedule, **kw)[names[0]]
    torch.testing.assert_close(again, v, rtol=0, atol=0)  # recorded again: the same trajectories, the same tokens
    # a cache written without the sampling record (older ditq: config and model only) is not trusted
    old_meta = {"config": json.dumps(asdict(cfg), sort_keys=True), "model": "m"}
    save_file({names[0]: torch.zeros_like(v)}, str(path), metadata=old_meta)
    fresh = load_or_record(path, loaded.model, names, cfg, schedule=loaded.schedule, **kw)[names[0]]
    torch.testing.assert_close(fresh, v, rtol=0, atol=0)


class _Stop(Exception):
    """Ends a CLI run once what the test looks at has happened."""


def _spy_sampler(monkeypatch, seen, stop: bool):
    """Records the ``schedule`` of every sampler call (calibration and sensitivity trajectories call it);
    ``stop``: then ends the run."""
    import ditq.calib.calibration as calibration
    import ditq.runtime.samplers as samplers

    real = samplers.sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("schedule"))
        if stop:
            raise _Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(samplers, "sample", spy)
    monkeypatch.setattr(calibration, "sample", spy)  # the trajectories' sampler, as calibration imports it


def test_cli_gptq_calibration_samples_with_the_pipelines_scheduler_and_keys_its_cache(v_folder, tmp_path, monkeypatch):
    from safetensors import safe_open

    import ditq.workflows.export as export_workflow

    want, seen, cache = load_model(str(v_folder)).schedule, [], tmp_path / "cache"
    _spy_sampler(monkeypatch, seen, stop=False)

    def stop(*_a, **_k):
        raise _Stop

    monkeypatch.setattr(export_workflow, "quantize_model", stop)  # calibration is done and cached by then
    with pytest.raises(_Stop):
        main(["--quiet", "export", "--model", str(v_folder), "--wbits", "4", "--abits", "8", "--group-size", "32",
              "--method", "gptq", "--calib-samples", "2", "--calib-timesteps", "2", "--calib-cache", str(cache),
              "--out", str(tmp_path / "m")])  # fmt: skip
    assert seen == [want]
    (cached,) = cache.iterdir()
    with safe_open(str(cached), "pt") as f:
        assert json.loads(f.metadata()["sampling"]) == {"schedule": want.to_dict(), "clip_denoised": False}


def test_cli_mixed_sensitivity_samples_with_the_pipelines_scheduler(v_folder, tmp_path, monkeypatch):
    want, seen = load_model(str(v_folder)).schedule, []
    _spy_sampler(monkeypatch, seen, stop=True)
    with pytest.raises(_Stop):
        main(["--quiet", "recipe", "--model", str(v_folder), "--wbits", "1.58", "--abits", "4", "--mixed",
              "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert seen == [want]


@pytest.fixture(scope="module")
def pixel_v_folder(tmp_path_factory):
    """``(pipeline folder, model folder)``: a digits-shaped pixel model whose ditq_pipeline.json records the
    v_prediction schedule of the pipeline's scheduler config (with clip_sample), as a model ``ditq qat``
    wrote from such a pipeline would."""
    from ditq.schedule import SchedulerSpec

    digits_like = dit_config(64, 2, 2, in_channels=1, out_channels=1, sample_size=8, num_classes=10)
    folder = _pipeline_folder(tmp_path_factory.mktemp("pixel") / "pipe", {**V_SCHED, "clip_sample": True}, digits_like)
    spec = SchedulerSpec.from_scheduler_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    pipe = {"space": "pixel", "value_range": [-1.0, 1.0], "clip_denoised": True, "judge": "digits", "schedule": spec.to_dict()}
    (folder / "transformer" / "ditq_pipeline.json").write_text(json.dumps(pipe))
    return folder, folder / "transformer"


def test_fitness_float_samples_follow_the_models_scheduler(pixel_v_folder):
    from ditq.workflows import fitness
    from ditq.workflows.fitness import FitnessConfig, ParallelFitness

    ref_folder, model_dir = pixel_v_folder
    cfg = FitnessConfig(num_samples=4, steps=5, cfg=1.5, seed=7)
    pf = ParallelFitness(str(model_dir), cfg=cfg, workers=1)
    try:
        got = fitness._W["float"]
        model = fitness._W["model"]
    finally:
        pf.close()
        fitness._W.clear()
    noise = np.random.default_rng(cfg.seed).standard_normal((4, 1, 8, 8)).astype(np.float32)
    _, want = reference_ddim(model, ref_folder, noise, np.arange(4) % 10, steps=5, guidance=1.5, null_class=10)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)  # float64 vs float32 steps, as above


def test_eval_probes_the_float_model_at_the_schedules_first_timestep(pixel_v_folder, monkeypatch):
    """``ditq eval``'s float probe (its SQNR reference) runs at the first timestep the sampler evaluates."""
    import ditq.adapters.dit as dit
    from ditq.workflows.evaluate import evaluate, parse_configs

    ref_folder, model_dir = pixel_v_folder
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(ref_folder, subfolder="scheduler")
    sched.set_timesteps(6)
    probed, real = [], dit.TorchDiT

    class Spy(real):
        def __call__(self, x, t, y):
            probed.append(np.asarray(t).copy())
            return super().__call__(x, t, y)

    monkeypatch.setattr(dit, "TorchDiT", Spy)
    rep = evaluate(str(model_dir), parse_configs("fp", None), num_samples=2, steps=6, progress=False)
    assert int(sched.timesteps[0]) == 831 and {int(v) for v in probed[0]} == {831}  # DiT's schedule: 999
    assert np.isfinite(rep.rows[0].sqnr_db)


# ------------------------------------------------------------------------ one reader of pipeline records
def test_loaders_compute_the_pipeline_once_and_it_is_what_pipeline_info_says(v_folder):
    loaded = load_model(str(v_folder))
    assert loaded.pipeline == pipeline_info(loaded.source)
    assert loaded.pipeline.schedule.prediction_type == "v_prediction"
    assert load_model("dit-s-2").pipeline == Pipeline(space="latent", clip_denoised=False, conditioning=ClassConditioning(1000, 1000))


def test_an_unchecked_transformer_config_is_refused_when_the_schedule_needs_it(tmp_path):
    """learned_range needs variance channels: read from the checked transformer config, so a mistyped
    out_channels is named, not taken for "no variance channels"."""
    folder = _pipeline_folder(tmp_path / "pipe", {"variance_type": "learned_range"}, tiny_config(), "DDPMScheduler")
    assert pipeline_info({"kind": "diffusers", "path": str(folder)}).schedule.variance_type == "learned_range"
    dit = folder / "transformer" / "config.json"
    dit.write_text(json.dumps({**json.loads(dit.read_text()), "out_channels": "8"}))
    with pytest.raises(DitqError, match="out_channels must be"):
        pipeline_info({"kind": "diffusers", "path": str(folder)})


@pytest.mark.parametrize(
    "pipeline,needle",
    [
        ({"space": "latent", "vae": "other.onnx", "scaling_factor": 0.5}, "vae must be null or 'vae_decoder.onnx'"),
        ({"space": "latent", "schedule": {"prediction_type": "x0"}}, "prediction_type"),
    ],
)
def test_an_exported_pipeline_record_is_checked_when_the_model_opens(tmp_path, pipeline, needle):
    from ditq.runtime.generate import ExportedDiT

    from .test_hostile_models import fake_export

    folder = fake_export(tmp_path / "m", **{"ditq.pipeline": json.dumps(pipeline)})
    shutil.copy(folder / "vae_decoder.onnx", folder / "other.onnx")  # a working file: only its name is wrong
    with pytest.raises(DitqError, match=f"ditq.pipeline: .*{needle}"):
        ExportedDiT.open(folder)
