"""Scheduler settings (issue 12, item 3): every setting of a diffusers scheduler config that changes
sampling is implemented by ditq's samplers, checked step by step against diffusers' own ``DDIMScheduler`` /
``DDPMScheduler`` on the same model function and noise, or refused at export (exit 2, one line naming the
setting and its value, nothing written).

Each parity check has two parts. The training schedule: ditq's ``alphas_cumprod`` (float64) against the
one diffusers builds in float32 (float32 betas and a 1000-term float32 product): within ``SCHEDULE_RTOL``
(measured 5e-7), plus 1e-12 absolute for squaredcos_cap_v2's last value (2.4e-9, after a beta capped at
0.999, whose float32 ``1 - beta`` keeps 4 digits).
The sampling: diffusers' scheduler is handed that same schedule in float64, both sides step in float64 and
the model sees the same float32 input, so the only difference left is that ditq's trajectory records each
sample in float32: every step agrees to ``STEP_REL`` relative (float32 rounding is 6e-8; measured 5.8e-8).
With diffusers' own float32 schedule the steps agree to 1e-5 (measured 7.1e-6, at the noisiest steps of
squaredcos_cap_v2, where ``abar`` is about 1e-9); the end-to-end export test below uses it unmodified
(measured 3.2e-7 there).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditq.cli import main
from ditq.models import build_dit, pipeline_info
from ditq.runtime.samplers import sample, seeded_noise
from ditq.schedule import SchedulerSpec

from .conftest import assert_one_line_refusal, run, tiny_config

SCHEDULE_RTOL = 1e-6  # see the module docstring
STEP_REL = 2e-7
E2E_REL = 1e-5
C, SIZE = 2, 4  # channels and size of the parity samples


def _model(x: np.ndarray, t: np.ndarray, y: np.ndarray, *, variance: bool = False) -> np.ndarray:
    """A smooth, nonlinear stand-in for a DiT: the output depends on x and t (and class y), and, with
    ``variance``, DiT-style variance values in (-1, 1) follow in C more channels."""
    tt = t.reshape(-1, 1, 1, 1).astype(np.float64)
    out = 0.9 * np.tanh(x) + 0.2 * np.sin(tt / 97.0 + x) + 0.01 * y.reshape(-1, 1, 1, 1)
    if variance:
        out = np.concatenate([out, np.tanh(0.5 * x + tt / 1000.0 - 0.5)], axis=1)
    return out.astype(np.float32)


class _TorchNoise:
    """An ``rng`` for ditq's sampler that draws what diffusers' ``randn_tensor`` draws on CPU from a
    torch generator seeded the same way, so both samplers add the same noise."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape):
        return torch.randn(shape, generator=self.g, dtype=torch.float64).numpy()


def _diffusers_run(sched, noise: np.ndarray, labels: np.ndarray, *, ddpm: bool, variance: bool, eta: float, seed: int):
    """diffusers' own loop (the DiT pipeline's: the scheduler gets the first C channels, except DDPM with
    learned_range, which gets the variance channels too); returns the timesteps and each step's x_prev."""
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(noise.astype(np.float64))
    steps = []
    for t in sched.timesteps:
        out = _model(x.numpy().astype(np.float32), np.full(len(x), int(t)), labels, variance=variance)
        out = torch.from_numpy(out.astype(np.float64))
        if ddpm:
            if sched.config.variance_type != "learned_range":
                out = out[:, :C]
            x = sched.step(out, t, x, generator=g).prev_sample
        else:
            x = sched.step(out[:, :C], t, x, eta=eta, generator=g if eta > 0 else None).prev_sample
        steps.append((int(t), x.numpy().copy()))
    return steps


def _use_float64_schedule(sched, betas: np.ndarray) -> None:
    """Give a diffusers DDIM/DDPM scheduler the schedule of ``betas`` in float64 (it builds it in float32)."""
    b = torch.from_numpy(betas)
    sched.betas, sched.alphas = b, 1.0 - b
    sched.alphas_cumprod = torch.cumprod(1.0 - b, dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):  # DDIM: 1 or abar_0 (set_alpha_to_one)
        sched.final_alpha_cumprod = sched.one if sched.config.set_alpha_to_one else sched.alphas_cumprod[0]


def _parity(cls_name: str, cfg: dict, *, method: str, steps: int, variance: bool = False, eta: float = 0.0,
            **diffusers_over) -> float:  # fmt: skip
    """Run ditq's sampler with the spec read from the ``scheduler_config.json`` that diffusers' ``cls_name``
    writes for ``cfg`` and diffusers' DDIM/DDPM scheduler of that config; assert the timesteps are equal and
    every step's sample agrees to ``REL``; return the largest relative error."""
    import diffusers

    full = json.loads(getattr(diffusers, cls_name)(**cfg).to_json_string())  # every setting, as saved
    spec = SchedulerSpec.from_scheduler_config(full, learned_sigma=variance)
    assert SchedulerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # what export writes, sample reads
    ref_cls = getattr(diffusers, "DDPMScheduler" if method == "ddpm" else "DDIMScheduler")
    sched = ref_cls.from_config({**full, **diffusers_over})
    sched.set_timesteps(steps)
    np.testing.assert_allclose(spec.alphas_cumprod, sched.alphas_cumprod.double().numpy(), rtol=SCHEDULE_RTOL, atol=1e-12)
    _use_float64_schedule(sched, spec.betas)

    labels = np.array([1, 4, 7])
    noise = seeded_noise(3, len(labels), C, SIZE)
    traj: list = []
    sample(lambda x, t, y: _model(x, t, y, variance=variance), noise, labels, schedule=spec, steps=steps,
           method=method, eta=eta, trajectory=traj, rng=_TorchNoise(5))  # fmt: skip
    ref = _diffusers_run(sched, noise, labels, ddpm=method == "ddpm", variance=variance, eta=eta, seed=5)
    assert [t for t, _, _ in traj] == [t for t, _ in ref]
    worst = 0.0
    for (t, _, got), (_, want) in zip(traj, ref):
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err <= STEP_REL, f"timestep {t}: relative error {err:.2e}"
        worst = max(worst, err)
    return worst


# Each case covers several settings; together they cover every accepted value of every setting.
DDIM_CASES = {
    "epsilon-linear-leading": dict(beta_schedule="linear", clip_sample=False),
    "v-scaled_linear-leading-offset": dict(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                           beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False),
    "sample-squaredcos-trailing": dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2",
                                       timestep_spacing="trailing", clip_sample=False),
    "epsilon-squaredcos-linspace-alpha0": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace",
                                               set_alpha_to_one=False, clip_sample=False),
    "epsilon-clip-range": dict(clip_sample=True, clip_sample_range=1.5),
    "v-zero_snr-trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                timestep_spacing="trailing", clip_sample=False),
    "trained_betas": dict(num_train_timesteps=200, trained_betas=list(np.linspace(2e-4, 0.05, 200)), clip_sample=False),
    "defaults": dict(),  # DDIMScheduler's own defaults: clip_sample true, leading, set_alpha_to_one
}  # fmt: skip


@pytest.mark.parametrize("steps", [10, 7])
@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_matches_diffusers_ddim_scheduler(case, steps):
    _parity("DDIMScheduler", DDIM_CASES[case], method="ddim", steps=steps)


def test_ddim_with_eta_matches_diffusers_given_the_same_noise():
    _parity("DDIMScheduler", dict(prediction_type="v_prediction", set_alpha_to_one=False, clip_sample=False),
            method="ddim", steps=8, eta=0.7)  # fmt: skip


DDPM_CASES = {
    "epsilon-fixed_small-leading": (dict(clip_sample=False), False),
    "v-fixed_large-trailing": (dict(prediction_type="v_prediction", variance_type="fixed_large",
                                    timestep_spacing="trailing", clip_sample=False), False),
    "sample-fixed_small_log-linspace-clip": (dict(prediction_type="sample", variance_type="fixed_small_log",
                                                  timestep_spacing="linspace", clip_sample_range=0.8), False),
    "epsilon-learned_range-squaredcos-offset": (dict(variance_type="learned_range", beta_schedule="squaredcos_cap_v2",
                                                     steps_offset=3, clip_sample=False), True),
    "v-zero_snr-learned_range": (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      variance_type="learned_range", timestep_spacing="trailing", clip_sample=False), True),
}  # fmt: skip


@pytest.mark.parametrize("steps", [10, 7])
@pytest.mark.parametrize("case", list(DDPM_CASES))
def test_ddpm_matches_diffusers_ddpm_scheduler_given_the_same_noise(case, steps):
    cfg, variance = DDPM_CASES[case]
    _parity("DDPMScheduler", cfg, method="ddpm", steps=steps, variance=variance)


def test_ditq_default_schedule_is_diffusers_ddim_when_the_steps_divide_1000():
    """Models without a scheduler config sample with DiT's respacing; for S dividing 1000 that is diffusers'
    leading spacing, and ditq's DDIM then equals DDIMScheduler without clipping."""
    import diffusers

    spec = SchedulerSpec()
    sched = diffusers.DDIMScheduler(clip_sample=False)
    sched.set_timesteps(20)
    labels = np.array([2, 3])
    noise = seeded_noise(1, 2, C, SIZE)
    traj: list = []
    sample(_model, noise, labels, schedule=spec, steps=20, trajectory=traj)
    ref = _diffusers_run(sched, noise, labels, ddpm=False, variance=False, eta=0.0, seed=0)
    assert [t for t, _, _ in traj] == [t for t, _ in ref]
    np.testing.assert_allclose(traj[-1][2], ref[-1][1], rtol=0, atol=E2E_REL * np.abs(ref[-1][1]).max())


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_dpm_solver_config_samples_with_its_training_schedule(method):
    """A DPMSolverMultistepScheduler config (DiT pipelines may ship one): ditq samples with its own DDIM/DDPM
    over the config's training schedule, prediction type and spacing, i.e. as diffusers' DDIM/DDPM scheduler
    built from the same config (no clipping: DPM-Solver has none); the solver settings do not apply."""
    cfg = dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               solver_order=1, use_karras_sigmas=True, solver_type="heun")  # fmt: skip
    _parity("DPMSolverMultistepScheduler", cfg, method=method, steps=9, clip_sample=False)


def test_records_without_the_new_fields_read_as_dits_conventions():
    """Exports of ditq 0.1 recorded only the four beta fields: they keep sampling as they did (DiT's
    respacing, epsilon, no clipping) over the recorded betas."""
    spec = SchedulerSpec.from_dict({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    assert (spec.timestep_spacing, spec.prediction_type, spec.clip_sample) == ("dit", "epsilon", False)
    np.testing.assert_allclose(np.sqrt(spec.betas[[0, -1]]), np.sqrt([0.00085, 0.012]))


# ------------------------------------------------------------------------------- export, then sample
def _pipeline_folder(root, scheduler_config: dict):
    """A DiT pipeline folder without a VAE (latents out): ``model_index.json``, a tiny random DiT in
    ``transformer/`` and ``scheduler/scheduler_config.json`` holding ``scheduler_config`` as given."""
    folder = root / "pipe"
    build_dit(tiny_config(), seed=3).save_pretrained(folder / "transformer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    return folder


def _saved_config(cls_name: str, **settings) -> dict:
    import diffusers

    return json.loads(getattr(diffusers, cls_name)(**settings).to_json_string())


def test_exported_v_prediction_squaredcos_pipeline_samples_as_its_diffusers_scheduler(tmp_path):
    """``ditq export`` of a pipeline folder whose scheduler predicts v over a squaredcos_cap_v2 schedule (both
    once misread: v sampled as epsilon, squaredcos refused by ``ditq sample``), then ``ditq sample`` (ONNX
    Runtime, ditq's DDIM): the latents are what diffusers' DDIMScheduler of the folder's own config makes with
    the same exported model and noise (its unmodified float32 schedule: ``E2E_REL``, module docstring)."""
    from diffusers import DDIMScheduler

    from ditq.runtime.session import OrtDiT

    cfg = _saved_config("DDIMScheduler", prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", steps_offset=1,
                        clip_sample_range=1.5)  # fmt: skip
    folder = _pipeline_folder(tmp_path, cfg)
    out, npy = tmp_path / "m", tmp_path / "lat.npy"
    assert main(["--quiet", "export", "--model", str(folder), "--wbits", "8", "--abits", "16", "--group-size", "32",
                 "--out", str(out)]) == 0  # fmt: skip
    assert main(["--quiet", "sample", str(out), "--classes", "0,3", "--per-class", "2", "--steps", "6", "--cfg", "1",
                 "--seed", "4", "--out", str(npy)]) == 0  # fmt: skip
    got = np.load(npy)

    fn, labels = OrtDiT(out / "model.onnx"), np.repeat(np.array([0, 3]), 2)
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(6)
    x = torch.from_numpy(seeded_noise(4, 4, 4, 8).astype(np.float64))
    for t in sched.timesteps:
        model_out = fn(x.numpy().astype(np.float32), np.full(4, int(t), np.int64), labels)[:, :4]  # drop learned sigma
        x = sched.step(torch.from_numpy(model_out.astype(np.float64)), t, x).prev_sample
    want = x.numpy()
    assert np.abs(got - want).max() <= E2E_REL * np.abs(want).max()


REFUSED = {
    "thresholding": ({"thresholding": True}, "thresholding=true"),
    "unknown setting": ({"karras_magic": 2}, "karras_magic=2"),
    "beta schedule": ({"beta_schedule": "sigmoid"}, 'beta_schedule="sigmoid"'),
    "prediction type": ({"prediction_type": "flow_prediction"}, 'prediction_type="flow_prediction"'),
    "scheduler class": ({"_class_name": "EulerDiscreteScheduler"}, '"EulerDiscreteScheduler"'),
    "zero snr with epsilon": ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=true"),
    "trained betas length": ({"trained_betas": [0.01, 0.02]}, "trained_betas=[0.01, 0.02]"),
    "spacing": ({"timestep_spacing": "karras"}, 'timestep_spacing="karras"'),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_scheduler_settings_are_refused_at_export(tmp_path, capsys, case):
    """One line naming the setting and its value, exit 2, and no output folder (not even its parent)."""
    change, named = REFUSED[case]
    folder = _pipeline_folder(tmp_path, {**_saved_config("DDIMScheduler"), **change})
    out = tmp_path / "outs" / "m"
    capsys.readouterr()
    code, _, err = run(["export", "--model", str(folder), "--wbits", "8", "--abits", "16", "--group-size", "32",
                        "--out", str(out)], capsys)  # fmt: skip
    assert_one_line_refusal(code, err, named)
    assert not (tmp_path / "outs").exists()


def test_a_dpm_solver_ditq_does_not_implement_is_refused_at_export(tmp_path, capsys):
    """Not sampled with DDIM in its place (as before): one line naming the setting, exit 2, no output."""
    folder = _pipeline_folder(tmp_path, {**_saved_config("DPMSolverMultistepScheduler"), "use_lu_lambdas": True})
    out = tmp_path / "outs" / "m"
    capsys.readouterr()
    code, _, err = run(["export", "--model", str(folder), "--wbits", "8", "--abits", "16", "--group-size", "32",
                        "--out", str(out)], capsys)  # fmt: skip
    assert_one_line_refusal(code, err, "use_lu_lambdas=true")
    assert not (tmp_path / "outs").exists()


@pytest.mark.parametrize(
    "cls_name,change,named",
    [
        ("DDPMScheduler", {"variance_type": "learned"}, 'variance_type="learned"'),
        ("DDPMScheduler", {"variance_type": "fixed_large_log"}, 'variance_type="fixed_large_log"'),
        ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas=true"),
        ("DPMSolverMultistepScheduler", {"clip_sample": True}, "clip_sample=true"),  # not a DPM-Solver setting
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order=3"),  # a solver ditq does not implement
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 'algorithm_type="sde-dpmsolver++"'),
        ("DDIMScheduler", {"clip_sample_range": -1}, "clip_sample_range=-1"),
        ("DDIMScheduler", {"steps_offset": 1.5}, "steps_offset=1.5"),
    ],
)
def test_pipeline_info_refuses_each_unimplemented_value(tmp_path, cls_name, change, named):
    from ditq.errors import DitqError

    folder = _pipeline_folder(tmp_path, {**_saved_config(cls_name), **change})
    with pytest.raises(DitqError, match="scheduler_config.json: ") as e:
        pipeline_info({"kind": "diffusers", "path": str(folder)})
    assert named in str(e.value)


def test_learned_range_needs_a_model_that_predicts_variance():
    from ditq.errors import DitqError

    cfg = _saved_config("DDPMScheduler", variance_type="learned_range")
    assert SchedulerSpec.from_scheduler_config(cfg, learned_sigma=True).variance_type == "learned_range"
    with pytest.raises(DitqError, match='variance_type="learned_range" needs a model that predicts variance'):
        SchedulerSpec.from_scheduler_config(cfg, learned_sigma=False)
