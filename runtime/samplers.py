"""DDPM and DDIM samplers over a DiT *callable* (numpy in, numpy out; no torch import).

A model is any ``f(sample [B,C,H,W] float32, timestep [B] int64, class_labels [B] int64) -> [B,C',H,W]``
with ``C' = C`` (the prediction: epsilon, v or x0) or ``C' = 2C`` (and DiT's learned-variance values): an
ONNX Runtime session (:class:`ditq.runtime.session.OrtDiT`), or a PyTorch model wrapped by its family
adapter's ``torch_callable`` (``ditq.adapters.dit.TorchDiT``: the float model or the quantized reference). So one loop drives all
three, and their trajectories can be compared step by step.

The schedule, the timesteps, the prediction type and clipping come from a
:class:`~ditq.schedule.SchedulerSpec` (its module docstring has the formulas). Without one the
conventions are DiT's (``diffusion/gaussian_diffusion.py``): a 1000-step linear beta schedule; sampling
with ``S`` steps respaces the process onto ``S`` of the original timesteps (the model still sees the
original timestep numbers); learned sigma interpolates, in log space, between the respaced process's
posterior variance and its beta. With a spec read from a diffusers scheduler config, DDIM steps as
diffusers' ``DDIMScheduler`` and DDPM as its ``DDPMScheduler`` do with that config. Classifier-free
guidance runs the conditional and the null-class batch together and guides the first ``C`` output
channels (what the model predicts), taking the variance values from the conditional half.

One step from ``x_t`` (``a = abar_t``, ``a' = abar`` of the previous timestep, ``beta = 1 - a / a'``):
DDIM ``x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z`` with
``sigma = eta sqrt((1 - a') / (1 - a) beta)``; DDPM ``x' = sqrt(a') beta / (1 - a) x0 +
sqrt(1 - beta) (1 - a') / (1 - a) x + std z`` with noise only for ``t > 0``, where ``std^2`` is the
posterior variance ``(1 - a') / (1 - a) beta`` (``fixed_small``), ``beta`` (``fixed_large``) or, for
``learned_range``, ``exp(f log beta + (1 - f) log posterior)`` with ``f = (v + 1) / 2``.

``dpm++2m`` steps as diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++, :mod:`ditq.dpm_solver`) with
the spec's :attr:`~ditq.schedule.SchedulerSpec.dpm_solver` settings (diffusers' defaults when the spec has
none), in float32 as diffusers does; the variance values of a learned-sigma model are dropped.

Flow-matching models (velocity prediction: SD3, Flux) sample with :func:`sample_flow`: the Euler steps of
a :class:`~ditq.flow.FlowMatchSpec` over a velocity callable.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ditq.dpm_solver import SAMPLER as DPM_SAMPLER, DPMSolverPP, DPMSolverSettings
from ditq.errors import DitqError
from ditq.flow import FlowMatchSpec
from ditq.schedule import SchedulerSpec

ModelFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
METHODS = ("ddim", "ddpm", DPM_SAMPLER)
_F32_MAX = float(np.finfo(np.float32).max)


def _guided(model: ModelFn, x: np.ndarray, t: int, labels: np.ndarray, cfg: float, null_class: int | None) -> np.ndarray:
    """One model evaluation, with classifier-free guidance when ``cfg != 1``."""
    b = x.shape[0]
    if cfg == 1.0:
        return _finite_output(model(x, np.full(b, t, np.int64), labels), t)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the null class id (the model's number of classes)")
    out = model(
        np.concatenate([x, x]), np.full(2 * b, t, np.int64), np.concatenate([labels, np.full(b, null_class, np.int64)])
    )
    out = _finite_output(out, t)
    cond, uncond = out[:b], out[b:]
    c = x.shape[1]
    eps = uncond[:, :c] + cfg * (cond[:, :c] - uncond[:, :c])
    return np.concatenate([eps, cond[:, c:]], axis=1)


def _finite_output(out: np.ndarray, t: int | str) -> np.ndarray:
    """``out`` when all of it is finite: a model that produces NaN or Inf stops the sampler."""
    if not np.isfinite(out).all():
        raise DitqError(f"sampling stopped at timestep {t}: the model's output holds NaN or Inf values")
    return out


def sample(
    model: ModelFn,
    noise: np.ndarray,
    labels: np.ndarray,
    *,
    schedule: SchedulerSpec | None = None,
    steps: int = 50,
    method: str | None = None,
    cfg: float = 1.0,
    null_class: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    seed: int = 0,
    progress: bool = False,
    trajectory: list | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Denoise ``noise`` ([B,C,H,W]) into samples of ``labels`` ([B]) in ``steps`` model evaluations.

    ``method`` ``ddim`` is deterministic for ``eta=0``, and so is ``dpm++2m``; ``ddpm`` (and DDIM with
    ``eta>0``) draws its per-step noise from ``rng`` (anything with ``standard_normal(shape)``; default
    ``numpy.random.default_rng(seed)``); None: the schedule's ``default_sampler``. ``schedule`` defaults to
    DiT's (``SchedulerSpec()``).
    ``clip_denoised`` clamps the predicted ``x_0`` to [-1, 1] (pixel-space models) when the schedule does
    not clip itself (``clip_sample``). When ``trajectory`` is a list, each step appends
    ``(timestep, model output, x_prev)``. A model output or a step that is not finite (NaN, Inf) stops
    the sampler with a :class:`DitqError`.
    """
    spec = schedule or SchedulerSpec()
    method = method or spec.default_sampler
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose from {METHODS}")
    clip = spec.clip_sample_range if spec.clip_sample else (1.0 if clip_denoised else None)
    if method == DPM_SAMPLER:
        return _sample_dpm(model, noise, labels, spec, steps, cfg, null_class, clip, progress, trajectory)
    ts, prev = spec.plan(steps, method)
    abar_all = spec.alphas_cumprod
    final = 1.0 if method == "ddpm" or spec.set_alpha_to_one else float(abar_all[0])  # abar after the last step
    rng = rng if rng is not None else np.random.default_rng(seed)
    x = noise.astype(np.float64)
    labels = np.asarray(labels, np.int64)
    c = noise.shape[1]
    for i in tqdm(range(len(ts)), desc=f"{method} sampling", unit="step", disable=not progress, leave=False):
        t = int(ts[i])
        out = _guided(model, x.astype(np.float32), t, labels, cfg, null_class).astype(np.float64)
        _check_channels(out, c)
        abar = float(abar_all[t])
        abar_prev = float(abar_all[prev[i]]) if prev[i] >= 0 else final
        x0, eps = spec.predict(x, out[:, :c], abar)
        if clip is not None:
            x0 = np.clip(x0, -clip, clip)
            if spec.use_clipped_model_output:
                eps = (x - np.sqrt(abar) * x0) / np.sqrt(1.0 - abar)
        if method == "ddim":
            sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = np.sqrt(abar_prev) * x0 + np.sqrt(np.maximum(1 - abar_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * rng.standard_normal(x.shape)
        else:
            x = _ddpm_step(spec, x, x0, abar, abar_prev, out[:, c:] if out.shape[1] == 2 * c else None, t, rng)
        if not np.abs(x).max(initial=0.0) <= _F32_MAX:  # NaN, Inf or beyond float32 (the samples' type): the
            # model's output was finite, so the guidance or the schedule overflowed
            raise DitqError(f"sampling stopped at timestep {t}: the samples became NaN or Inf (guidance scale {cfg:g})")
        if trajectory is not None:
            trajectory.append((t, out.astype(np.float32), x.astype(np.float32)))
    return x.astype(np.float32)


def _check_channels(out: np.ndarray, c: int) -> None:
    if out.shape[1] not in (c, 2 * c):
        raise DitqError(f"the model's output has {out.shape[1]} channels; expected {c} or {2 * c} for {c} input channels")


def _sample_dpm(model: ModelFn, noise, labels, spec: SchedulerSpec, steps: int, cfg: float, null_class, clip, progress,
                trajectory) -> np.ndarray:  # fmt: skip
    """:func:`sample` with DPM-Solver++ (float32 samples and model outputs, as diffusers steps them)."""
    plan = spec.dpm_plan(steps)
    solver = DPMSolverPP(plan, spec.dpm_solver or DPMSolverSettings(), spec.prediction_type, clip=clip)
    x = np.asarray(noise, np.float32)
    labels = np.asarray(labels, np.int64)
    c = x.shape[1]
    for i in tqdm(range(len(plan.timesteps)), desc=f"{DPM_SAMPLER} sampling", unit="step", disable=not progress, leave=False):
        t = int(plan.timesteps[i])
        out = _guided(model, x, t, labels, cfg, null_class)
        _check_channels(out, c)
        x = solver.step(i, x, out[:, :c])
        if not np.isfinite(x).all():
            raise DitqError(f"sampling stopped at timestep {t}: the samples became NaN or Inf (guidance scale {cfg:g})")
        if trajectory is not None:
            trajectory.append((t, np.asarray(out, np.float32), x))
    return x


def _ddpm_step(spec: SchedulerSpec, x, x0, abar: float, abar_prev: float, v, t: int, rng) -> np.ndarray:
    """The posterior ``q(x_prev | x_t, x0)`` mean, plus noise of the spec's variance type when ``t > 0``;
    ``v``: the model's variance values, or None."""
    beta = 1.0 - abar / abar_prev
    mean = (np.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * x
    if t == 0:
        return mean
    post_var = max((1 - abar_prev) / (1 - abar) * beta, 1e-20)
    kind = spec.variance_type or ("learned_range" if v is not None else "fixed_small")
    if kind == "learned_range":  # v in [-1, 1] between log(posterior variance) and log(beta)
        if v is None:
            raise DitqError("the schedule's variance_type learned_range needs a model that outputs variance channels "
                            f"(twice the {x.shape[1]} input channels); this one outputs {x.shape[1]}")
        frac = (v + 1) / 2
        std = np.exp(0.5 * (frac * np.log(beta) + (1 - frac) * np.log(post_var)))
    elif kind == "fixed_large":
        std = np.sqrt(beta)
    else:  # fixed_small, fixed_small_log
        std = np.sqrt(post_var)
    return mean + std * rng.standard_normal(x.shape)


def sample_flow(
    velocity: Callable[[np.ndarray, np.float32], np.ndarray],
    noise: np.ndarray,
    *,
    schedule: FlowMatchSpec,
    steps: int,
    image_tokens: int,
    progress: bool = False,
    trajectory: list | None = None,
) -> np.ndarray:
    """Denoise ``noise`` (sigma 1) to sigma 0 in ``steps`` Euler steps of a flow-matching ``schedule``
    (:mod:`ditq.flow`; ``image_tokens``: what its dynamic shift reads). ``velocity(x, t)`` is the model's
    (guided) velocity at samples ``x`` (float32) and the scheduler's timestep ``t`` (float32, ``N sigma``);
    the samples stay float32, as in diffusers' ``FlowMatchEulerDiscreteScheduler``. When ``trajectory`` is
    a list, each step appends ``(timestep, velocity, x_next)``. A non-finite velocity or step stops the
    sampler with a :class:`DitqError`."""
    sigmas, timesteps = schedule.plan(steps, image_tokens)
    x = np.asarray(noise, np.float32)
    for i in tqdm(range(len(timesteps)), desc="flow sampling", unit="step", disable=not progress, leave=False):
        t = timesteps[i]
        v = _finite_output(np.asarray(velocity(x, t), np.float32), f"{t:g}")
        if v.shape != x.shape:
            raise DitqError(f"the model's velocity has shape {list(v.shape)}; the samples have {list(x.shape)}")
        x = schedule.step(x, v, sigmas[i], sigmas[i + 1])
        if not np.isfinite(x).all():
            raise DitqError(f"sampling stopped at timestep {t:g}: the samples became NaN or Inf (check the guidance scale)")
        if trajectory is not None:
            trajectory.append((float(t), v, x))
    return x


def seeded_noise(seed: int, n: int, channels: int, size: int) -> np.ndarray:
    """The starting noise of ``n`` samples; sample ``k`` of a seed is the same for every config and batch size."""
    return np.random.default_rng(seed).standard_normal((n, channels, size, size)).astype(np.float32)
