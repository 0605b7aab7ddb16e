"""The flow-matching schedule (issue 15, item 4): ditq's numpy :class:`~ditq.flow.FlowMatchSpec` against
diffusers' own ``FlowMatchEulerDiscreteScheduler``, set up as ``StableDiffusion3Pipeline`` and
``FluxPipeline`` set it up (the independent reference), and its reading from a pipeline folder, its record,
and the settings it refuses.

Sigmas and timesteps are compared exactly: ditq computes every step in the element type diffusers does
(float64 for SD3's grid, float32 for Flux's), so the values are the same floats. The Euler trajectory is
compared exactly too: both sides take the same float32 model output and step ``x + (s' - s) v`` in float32.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ditq.errors import DitqError
from ditq.flow import FlowMatchSpec, read_schedule, schedule_from_config
from ditq.models import pipeline_info
from ditq.pipeline import Pipeline
from ditq.schedule import SchedulerSpec

from . import t2i_fixtures
from .conftest import assert_one_line_refusal, run

SD3_TINY = t2i_fixtures.SD3_TRANSFORMER


def _diffusers(cfg: dict, grid: str, steps: int, tokens: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler after the pipeline's ``set_timesteps`` (StableDiffusion3Pipeline's ``timesteps`` grid:
    mu only with dynamic shifting; FluxPipeline's ``sigmas`` grid: linspace(1, 1/S, S) and mu always)."""
    s = FlowMatchEulerDiscreteScheduler(**cfg)
    c = s.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    if grid == "sigmas":
        s.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    else:
        s.set_timesteps(steps, **({"mu": mu} if c.use_dynamic_shifting else {}))
    return s


CASES = [  # (scheduler config, grid, steps, image tokens)
    ({"shift": 3.0}, "timesteps", 28, 1024),  # SD3-medium's config
    ({"shift": 3.0}, "timesteps", 1, 1024),
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, "sigmas", 28, 64),  # Flux.1-dev, 256 px
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, "sigmas", 28, 4096),  # Flux.1-dev, 1024 px
    ({"use_dynamic_shifting": True}, "timesteps", 9, 4096),  # SD3.5-style dynamic shift
    ({"shift": 1.0}, "sigmas", 4, 64),  # Flux.1-schnell
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, "sigmas", 7, 300),
    ({"shift": 3.0, "shift_terminal": 0.1}, "timesteps", 7, 64),
    ({"shift": 3.0, "use_karras_sigmas": True}, "timesteps", 7, 64),
    ({"use_dynamic_shifting": True, "use_exponential_sigmas": True}, "sigmas", 7, 1000),
]


@pytest.mark.parametrize("cfg,grid,steps,tokens", CASES)
def test_sigmas_and_timesteps_are_diffusers_own(cfg, grid, steps, tokens):
    ref = _diffusers(cfg, grid, steps, tokens)
    sigmas, timesteps = FlowMatchSpec(**cfg, grid=grid).plan(steps, tokens)
    assert sigmas.dtype == timesteps.dtype == np.float32
    assert np.array_equal(sigmas, ref.sigmas.numpy()), (sigmas, ref.sigmas)
    assert np.array_equal(timesteps, ref.timesteps.numpy()), (timesteps, ref.timesteps)


def test_flux_dynamic_shift_depends_on_the_resolution():
    spec = FlowMatchSpec(use_dynamic_shifting=True, grid="sigmas")
    small, large = spec.plan(8, 64)[0], spec.plan(8, 4096)[0]
    assert (large[1:-1] > small[1:-1]).all()  # more tokens: more of the steps at high noise


def _velocity(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A smooth, nonlinear stand-in for a velocity model (float32 in, float32 out)."""
    return (np.tanh(x) - 0.3 * np.sin(x * 1.7 + t / 250.0)).astype(np.float32)


@pytest.mark.parametrize("cfg,grid,steps,tokens", [CASES[0], CASES[2], CASES[3]])
def test_euler_trajectory_is_diffusers_step_for_step(cfg, grid, steps, tokens):
    import torch

    x0 = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    sched = _diffusers(cfg, grid, steps, tokens)
    spec = FlowMatchSpec(**cfg, grid=grid)
    sigmas, timesteps = spec.plan(steps, tokens)
    x, xr = x0.copy(), torch.from_numpy(x0.copy())
    for i, t in enumerate(sched.timesteps):
        assert np.float32(t.item()) == timesteps[i]
        xr = sched.step(torch.from_numpy(_velocity(xr.numpy(), np.float32(t.item()))), t, xr).prev_sample
        x = spec.step(x, _velocity(x, timesteps[i]), sigmas[i], sigmas[i + 1])
        assert x.dtype == np.float32 and np.array_equal(x, xr.numpy()), f"step {i}: {np.abs(x - xr.numpy()).max()}"


def test_the_record_round_trips_and_is_checked():
    spec = FlowMatchSpec(shift=3.0, grid="sigmas", use_dynamic_shifting=True, shift_terminal=0.2)
    pipe = Pipeline(schedule=spec, vae="vae_decoder.onnx", scaling_factor=1.5)
    back = Pipeline.from_dict(json.loads(pipe.to_json()), "m")
    assert back == pipe and isinstance(back.schedule, FlowMatchSpec)
    assert isinstance(read_schedule({}), SchedulerSpec)  # a record without a class: DiT's
    bad = {**spec.to_dict(), "shift": -1}
    with pytest.raises(DitqError, match=r"^m: shift=-1 is not supported"):
        Pipeline.from_dict({"schedule": bad}, "m")
    for field, value, needle in [("grid", "cosine", "grid"), ("extra", 1, "unknown schedule field extra"),
                                 ("base_image_seq_len", 256 * 16, "max_image_seq_len"), ("time_shift_type", "x", "time_shift_type")]:  # fmt: skip
        d = {**spec.to_dict(), field: value}
        if field == "base_image_seq_len":
            d["max_image_seq_len"] = 256 * 16
        with pytest.raises(DitqError, match=needle):
            Pipeline.from_dict({"schedule": d}, "m")


FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler"}


def _pipeline_folder(root, pipeline_class: str, family: str, transformer: dict, scheduler: dict):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    for sub, cfg in (("transformer", {"_class_name": family, **transformer}), ("scheduler", scheduler)):
        (root / sub).mkdir()
        (root / sub / ("config.json" if sub == "transformer" else "scheduler_config.json")).write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def whole_pipelines(tmp_path_factory):
    """The tiny SD3 and Flux pipelines of :mod:`tests.t2i_fixtures` (read-only: tests copy them)."""
    root = tmp_path_factory.mktemp("flow")
    return {"sd3": t2i_fixtures.sd3_pipeline(root / "sd3"), "flux": t2i_fixtures.flux_pipeline(root / "flux")}


def test_a_pipeline_folder_gives_its_flow_schedule(tmp_path, whole_pipelines):
    sd3 = shutil.copytree(whole_pipelines["sd3"], tmp_path / "sd3")
    (sd3 / "scheduler" / "scheduler_config.json").write_text(json.dumps({**FLOW, "_diffusers_version": "0.42.1", "shift": 3.0}))
    pipe = pipeline_info({"kind": "diffusers", "path": str(sd3)})
    assert pipe.schedule == FlowMatchSpec(shift=3.0, grid="timesteps")
    flux = shutil.copytree(whole_pipelines["flux"], tmp_path / "flux")
    config = {**FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, max_shift=1.2).config, **FLOW}
    (flux / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pipe = pipeline_info({"kind": "diffusers", "path": str(flux)})
    assert pipe.schedule == FlowMatchSpec(use_dynamic_shifting=True, max_shift=1.2, grid="sigmas")
    assert Pipeline.from_dict(json.loads(pipe.to_json()), "m") == pipe


@pytest.mark.parametrize("setting,value,needle", [
    ("invert_sigmas", True, "invert_sigmas=true is not supported"),
    ("use_beta_sigmas", True, "use_beta_sigmas=true is not supported"),
    ("stochastic_sampling", True, "stochastic_sampling=true is not supported"),
    ("shift", 0, "shift=0 is not supported"),
    ("time_shift_type", "cubic", "time_shift_type=\"cubic\" is not supported"),
    ("sigma_schedule", "x" * 500, "unknown scheduler setting sigma_schedule"),
])  # fmt: skip
def test_export_refuses_flow_settings_it_does_not_implement(tmp_path, capsys, setting, value, needle):
    folder = _pipeline_folder(tmp_path / "sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel", SD3_TINY, {**FLOW, setting: value})
    code, _, err = run(["export", "--model", str(folder), "--wbits", "4", "--abits", "8", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, needle, "scheduler_config.json")
    assert not (tmp_path / "out").exists()


def test_a_scheduler_of_the_other_kind_is_refused(tmp_path):
    folder = _pipeline_folder(tmp_path / "sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel", SD3_TINY,
                              {"_class_name": "DDIMScheduler"})  # fmt: skip
    with pytest.raises(DitqError, match="does not sample SD3Transformer2DModel, which predicts velocity"):
        pipeline_info({"kind": "diffusers", "path": str(folder)})
    folder = _pipeline_folder(tmp_path / "other", "MyPipeline", "SD3Transformer2DModel", SD3_TINY, FLOW)
    with pytest.raises(DitqError, match="pipeline class \"MyPipeline\" spaces this model's flow-matching steps; it knows DitqDigitsPipeline, StableDiffusion3Pipeline$"):
        pipeline_info({"kind": "diffusers", "path": str(folder)})
    with pytest.raises(DitqError, match="take 2 or more steps"):
        FlowMatchSpec(shift_terminal=0.5).plan(1, 64)
    with pytest.raises(DitqError, match="mu"):
        FlowMatchSpec(use_dynamic_shifting=True, max_shift=50.0).plan(4, 1 << 24)
    assert isinstance(schedule_from_config({"_class_name": "DDIMScheduler"}, where="s"), SchedulerSpec)
