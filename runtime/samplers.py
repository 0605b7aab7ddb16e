"""DDPM and DDIM samplers over a DiT *callable* (numpy in, numpy out; no torch import).

A model is any ``f(sample [B,C,H,W] float32, timestep [B] int64, class_labels [B] int64) -> [B,C',H,W]``
with ``C' = C`` (epsilon prediction) or ``C' = 2C`` (epsilon and DiT's learned-variance values): an
ONNX Runtime session (:class:`ditq.runtime.session.OrtDiT`), or a PyTorch model wrapped by
``ditq.exporter.trace.TorchDiT`` (the float model or the quantized reference). So one loop drives all
three, and their trajectories can be compared step by step.

Conventions follow DiT (``diffusion/gaussian_diffusion.py``): a 1000-step linear beta schedule; sampling
with ``S`` steps respaces the process onto ``S`` of the original timesteps (the model still sees the
original timestep numbers); learned sigma interpolates, in log space, between the respaced process's
posterior variance and its beta; classifier-free guidance runs the conditional and the null-class
batch together and guides the epsilon channels, taking the variance values from the conditional half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

ModelFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
METHODS = ("ddim", "ddpm")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete diffusion process given by its betas (float64)."""

    betas: np.ndarray

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """DiT's schedule (the betas scale with 1000/num_timesteps, as in ``get_named_beta_schedule``)."""
        scale = 1000 / num_timesteps
        return cls(np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64))

    @classmethod
    def from_config(cls, cfg: dict) -> "NoiseSchedule":
        """A diffusers scheduler config's training schedule (``linear`` or ``scaled_linear`` betas)."""
        n = int(cfg.get("num_train_timesteps", 1000))
        b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        kind = cfg.get("beta_schedule", "linear")
        if kind == "linear":
            return cls(np.linspace(b0, b1, n, dtype=np.float64))
        if kind == "scaled_linear":
            return cls(np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2)
        raise ValueError(f"beta_schedule {kind!r} is not supported (linear, scaled_linear)")

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    def timesteps(self, steps: int) -> np.ndarray:
        """``steps`` evenly spaced original timesteps, ascending, starting at 0 (DiT's ``ddimN`` spacing)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_timesteps}, got {steps}")
        if self.num_timesteps % steps == 0:
            return np.arange(0, self.num_timesteps, self.num_timesteps // steps, dtype=np.int64)
        return np.round(np.linspace(0, self.num_timesteps - 1, steps)).astype(np.int64)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` per sample."""
        abar = self.alphas_cumprod[t].reshape(-1, *([1] * (x0.ndim - 1)))
        return (np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise).astype(x0.dtype)


@dataclass(frozen=True)
class _Respaced:
    """The process restricted to ``use`` timesteps (descending), with its own betas."""

    use: np.ndarray  # original timestep numbers, descending
    abar: np.ndarray  # alpha-bar at each used timestep
    abar_prev: np.ndarray  # alpha-bar of the next (less noisy) used timestep; 1 after the last
    betas: np.ndarray


def _respace(schedule: NoiseSchedule, steps: int) -> _Respaced:
    use = schedule.timesteps(steps)
    abar_full = schedule.alphas_cumprod[use]
    prev = np.concatenate([[1.0], abar_full[:-1]])
    betas = 1.0 - abar_full / prev
    return _Respaced(use[::-1].copy(), abar_full[::-1].copy(), prev[::-1].copy(), betas[::-1].copy())


def _guided(model: ModelFn, x: np.ndarray, t: int, labels: np.ndarray, cfg: float, null_class: int | None) -> np.ndarray:
    """One model evaluation, with classifier-free guidance when ``cfg != 1``."""
    b = x.shape[0]
    if cfg == 1.0:
        return model(x, np.full(b, t, np.int64), labels)
    if null_class is None:
        raise ValueError("classifier-free guidance needs the null class id (the model's number of classes)")
    out = model(
        np.concatenate([x, x]), np.full(2 * b, t, np.int64), np.concatenate([labels, np.full(b, null_class, np.int64)])
    )
    cond, uncond = out[:b], out[b:]
    c = x.shape[1]
    eps = uncond[:, :c] + cfg * (cond[:, :c] - uncond[:, :c])
    return np.concatenate([eps, cond[:, c:]], axis=1)


def sample(
    model: ModelFn,
    noise: np.ndarray,
    labels: np.ndarray,
    *,
    schedule: NoiseSchedule | None = None,
    steps: int = 50,
    method: str = "ddim",
    cfg: float = 1.0,
    null_class: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = False,
    seed: int = 0,
    progress: bool = False,
    trajectory: list | None = None,
) -> np.ndarray:
    """Denoise ``noise`` ([B,C,H,W]) into samples of ``labels`` ([B]) in ``steps`` model evaluations.

    ``method`` ``ddim`` is deterministic for ``eta=0``; ``ddpm`` (and DDIM with ``eta>0``) draws its
    per-step noise from ``numpy.random.default_rng(seed)``. ``clip_denoised`` clamps the predicted
    ``x_0`` to [-1, 1] (pixel-space models). When ``trajectory`` is a list, each step appends
    ``(timestep, model output, x_prev)``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose from {METHODS}")
    schedule = schedule or NoiseSchedule.linear()
    proc = _respace(schedule, steps)
    rng = np.random.default_rng(seed)
    x = noise.astype(np.float64)
    labels = np.asarray(labels, np.int64)
    c = noise.shape[1]
    for i in tqdm(range(len(proc.use)), desc=f"{method} sampling", unit="step", disable=not progress, leave=False):
        t = int(proc.use[i])
        out = _guided(model, x.astype(np.float32), t, labels, cfg, null_class).astype(np.float64)
        if out.shape[1] not in (c, 2 * c):
            raise ValueError(f"model output has {out.shape[1]} channels; expected {c} or {2 * c} for {c} input channels")
        eps = out[:, :c]
        abar, abar_prev, beta = proc.abar[i], proc.abar_prev[i], proc.betas[i]
        x0 = (x - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
        if clip_denoised:
            x0 = np.clip(x0, -1.0, 1.0)
            eps = (x - np.sqrt(abar) * x0) / np.sqrt(1.0 - abar)
        last = i == len(proc.use) - 1
        if method == "ddim":
            sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            x = np.sqrt(abar_prev) * x0 + np.sqrt(np.maximum(1 - abar_prev - sigma**2, 0.0)) * eps
            if sigma > 0 and not last:
                x = x + sigma * rng.standard_normal(x.shape)
        else:
            # posterior q(x_{t-1} | x_t, x_0) of the respaced process
            post_var = beta * (1 - abar_prev) / (1 - abar)
            mean = (np.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * x
            # DiT's clipped log posterior variance: at the last step (0) it takes the step before's value
            min_log = np.log(_first_post_var(proc) if last else post_var)
            if out.shape[1] == 2 * c:  # learned sigma: v in [-1, 1] between log(posterior var) and log(beta)
                max_log = np.log(beta)
                frac = (out[:, c:] + 1) / 2
                log_var = frac * max_log + (1 - frac) * min_log
            else:  # fixed small variance
                log_var = np.full_like(x, min_log)
            x = mean
            if not last:
                x = x + np.exp(0.5 * log_var) * rng.standard_normal(x.shape)
        if trajectory is not None:
            trajectory.append((t, out.astype(np.float32), x.astype(np.float32)))
    return x.astype(np.float32)


def _first_post_var(proc: _Respaced) -> float:
    """The posterior variance of the step before the last (DiT's ``posterior_log_variance_clipped``)."""
    if len(proc.use) < 2:
        return float(proc.betas[-1])
    i = len(proc.use) - 2
    return float(proc.betas[i] * (1 - proc.abar_prev[i]) / (1 - proc.abar[i]))


def seeded_noise(seed: int, n: int, channels: int, size: int) -> np.ndarray:
    """The starting noise of ``n`` samples; sample ``k`` of a seed is the same for every config and batch size."""
    return np.random.default_rng(seed).standard_normal((n, channels, size, size)).astype(np.float32)
