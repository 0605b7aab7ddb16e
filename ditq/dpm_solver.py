"""DPM-Solver++(2M): the multistep data-prediction solver of diffusers' ``DPMSolverMultistepScheduler``
(``algorithm_type: dpmsolver++``, ``solver_order`` 1 or 2), in numpy (no torch), in the same float32
arithmetic, operation for operation.

The schedule, as the scheduler builds it: betas rounded to float32, ``alpha = 1 - beta`` (float32),
``abar`` their running product accumulated in float64 and rounded to float32 (``torch.cumprod``'s CPU
kernel); with ``rescale_betas_zero_snr`` the last ``abar`` is ``2^-24``. ``sigma_t = sqrt((1 - abar_t) /
abar_t)`` (float32). Timesteps of ``S`` steps, descending (``N = num_train_timesteps``):

============  ======================================================================================
``linspace``  ``round(linspace(0, N - 1, S + 1))[::-1][:-1]``; also for DiT's own ``dit`` spacing
``leading``   ``(arange(S + 1) * (N // (S + 1)))[::-1][:-1] + steps_offset``
``trailing``  ``round(arange(N, 0, -N / S)) - 1``
karras        ``sigma_i = (smax^(1/7) + i / (S - 1) (smin^(1/7) - smax^(1/7)))^7`` between the training
              sigmas' ends, each mapped to a timestep by interpolating in log sigma (rounded, except for
              ``squaredcos_cap_v2``, where it is truncated)
============  ======================================================================================

A step's sigma is its timestep's (karras: its own); after the last step comes ``0``
(``final_sigmas_type: zero``) or ``sigma_0`` (``sigma_min``).

One step from sigma ``s`` (samples ``x``) to sigma ``t``: ``a = 1 / sqrt(1 + sigma^2)`` and ``n = sigma a``
(the signal's and the noise's scale), ``lambda = log a - log n``, ``h = lambda_t - lambda_s``; the model
output turned into the data prediction ``m`` (``epsilon``: ``(x - n_s o) / a_s``; ``v_prediction``:
``a_s x - n_s o``; ``sample``: ``o``; a learned-variance model's variance channels are not part of ``o``):

=====================  ===========================================================================
first order (DDIM)     ``x' = (n_t / n_s) x - a_t (e^-h - 1) m``
second order midpoint  ``x' = (n_t / n_s) x - a_t (e^-h - 1) D0 - 0.5 a_t (e^-h - 1) D1``
second order heun      ``x' = (n_t / n_s) x - a_t (e^-h - 1) D0 + a_t ((e^-h - 1) / h + 1) D1``
=====================  ===========================================================================

with ``D0 = m``, ``D1 = (m - m_prev) / r``, ``r = h_prev / h`` (``m_prev``, ``h_prev``: the previous step's).
The first step is first order, and so is the last when ``euler_at_final``, ``final_sigmas_type: zero``, or
``lower_order_final`` with fewer than 15 steps. ``log`` and ``exp`` are computed in float64 and rounded
(correctly rounded float32); torch's float32 ``log``/``exp`` are within one unit in the last place of that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from ditq.errors import DitqError, shown

SAMPLER = "dpm++2m"  # the --sampler name
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS = ("zero", "sigma_min")
# Settings of DPMSolverMultistepScheduler's solver that must keep diffusers' default for ditq's DPM-Solver++
# to be the one the config asks for (otherwise the config is refused at export).
FIXED: dict[str, Any] = {
    "algorithm_type": "dpmsolver++", "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
    "lambda_min_clipped": -math.inf,
}  # fmt: skip
_F32 = np.float32
_KARRAS_RHO = 7.0


@dataclass(frozen=True)
class DPMSolverSettings:
    """The DPM-Solver++ settings of a ``DPMSolverMultistepScheduler`` config that ditq implements (the
    defaults are diffusers')."""

    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    use_karras_sigmas: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> DitqError:
            return DitqError(f"dpm_solver: {name}={shown(getattr(self, name), 60, as_json=True)} is not supported ({why})")

        if type(self.solver_order) is not int or self.solver_order not in (1, 2):
            raise bad("solver_order", "ditq's DPM-Solver++ is of order 1 or 2")
        if not isinstance(self.solver_type, str) or self.solver_type not in SOLVER_TYPES:
            raise bad("solver_type", " or ".join(SOLVER_TYPES))
        for name in ("lower_order_final", "euler_at_final", "use_karras_sigmas"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if not isinstance(self.final_sigmas_type, str) or self.final_sigmas_type not in FINAL_SIGMAS:
            raise bad("final_sigmas_type", " or ".join(FINAL_SIGMAS))

    @classmethod
    def from_scheduler_config(cls, cfg: Mapping[str, Any]) -> "DPMSolverSettings":
        """The settings of a ``DPMSolverMultistepScheduler`` config; a solver ditq does not implement (a
        :data:`FIXED` setting off its default, or a setting :meth:`__post_init__` refuses) raises a
        :class:`DitqError` naming the setting: ditq does not sample such a config with another solver."""
        for key, want in FIXED.items():
            v = cfg.get(key, want)
            if type(v) is not type(want) or v != want:
                raise DitqError(f"DPMSolverMultistepScheduler {key}={shown(v, 60, as_json=True)} is not supported (ditq's "
                                f"DPM-Solver++ needs {key}={shown(want, 60, as_json=True)}); ditq samples no other solver in its place")  # fmt: skip
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


@dataclass(frozen=True)
class DPMPlan:
    """The timesteps of a run (int64, ``[S]``, what the model sees) and its sigmas (float32, ``[S + 1]``)."""

    timesteps: np.ndarray
    sigmas: np.ndarray


def alphas_cumprod_f32(betas: np.ndarray, zero_snr: bool) -> np.ndarray:
    """``abar`` as the scheduler builds it from ``betas`` (module docstring), float32."""
    alphas = _F32(1) - np.asarray(betas).astype(np.float32)
    abar = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    if zero_snr:
        abar[-1] = _F32(2.0**-24)
    return abar


def _sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) timestep of ``sigma``: linear interpolation in log sigma (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def dpm_plan(abar: np.ndarray, steps: int, *, spacing: str, steps_offset: int, settings: DPMSolverSettings,
             round_karras: bool = True) -> DPMPlan:  # fmt: skip
    """The timesteps and sigmas of ``steps`` steps over ``abar`` (float32, :func:`alphas_cumprod_f32`), as
    ``DPMSolverMultistepScheduler.set_timesteps`` computes them (module docstring); ``round_karras``: round
    karras timesteps (every beta schedule but ``squaredcos_cap_v2``)."""
    n = len(abar)
    if not 1 <= steps <= n:
        raise DitqError(f"steps must be in 1..{n} (the timesteps of this model's noise schedule), got {steps}")
    all_sigmas = np.sqrt((_F32(1) - abar) / abar)
    spacing = "linspace" if spacing == "dit" else spacing
    if spacing == "leading":
        ts = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1
    else:
        ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if settings.use_karras_sigmas:  # its own timesteps
        log_sigmas = np.log(all_sigmas)
        lo, hi = float(all_sigmas[0]), float(all_sigmas[-1])
        ramp = np.linspace(0, 1, steps)
        sigmas = (hi ** (1 / _KARRAS_RHO) + ramp * (lo ** (1 / _KARRAS_RHO) - hi ** (1 / _KARRAS_RHO))) ** _KARRAS_RHO
        t = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        ts = (t.round() if round_karras else t).astype(np.int64)
    else:
        if ts.max() >= n:
            raise DitqError(f"{steps} steps with steps_offset {steps_offset} reach timestep {ts.max()}, past this model's "
                            f"last ({n - 1}): take fewer steps")  # fmt: skip
        if len(np.unique(ts)) < steps:  # equal sigmas: a step of h = 0, which the second-order update divides by
            raise DitqError(f"{steps} steps repeat timesteps with {spacing} spacing over {n} training timesteps: take fewer steps")
        sigmas = np.interp(ts, np.arange(0, n), all_sigmas)
    last = all_sigmas[0] if settings.final_sigmas_type == "sigma_min" else 0.0
    return DPMPlan(ts, np.concatenate([sigmas, [last]]).astype(np.float32))


def _log(v: np.float32) -> np.float32:
    with np.errstate(divide="ignore"):  # log 0 = -inf: the final sigma 0
        return _F32(np.log(np.float64(v)))


def _exp(v: np.float32) -> np.float32:
    return _F32(np.exp(np.float64(v)))


def _scales(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """``(a, n, lambda)`` of ``sigma`` (float32; module docstring)."""
    a = _F32(1) / np.sqrt(sigma * sigma + _F32(1))
    n = sigma * a
    return a, n, _log(a) - _log(n)


class DPMSolverPP:
    """One sampling run of DPM-Solver++ over a :class:`DPMPlan`: :meth:`step` ``i = 0, 1, ...`` takes the
    samples at ``sigmas[i]`` and the model's output there and returns the samples at ``sigmas[i + 1]``
    (float32). ``clip``: clamp the data prediction to ``[-clip, clip]`` (pixel-space models; None: no clamp,
    as diffusers without thresholding)."""

    def __init__(self, plan: DPMPlan, settings: DPMSolverSettings, prediction_type: str, *, clip: float | None = None):
        self.plan, self.settings, self.prediction_type, self.clip = plan, settings, prediction_type, clip
        self._m_prev: np.ndarray | None = None

    def data_prediction(self, i: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The model output ``out`` at step ``i`` (samples ``x``) as a data prediction (float32)."""
        a, n, _ = _scales(self.plan.sigmas[i])
        if self.prediction_type == "epsilon":
            m = (x - n * out) / a
        elif self.prediction_type == "v_prediction":
            m = a * x - n * out
        else:
            m = out
        return m if self.clip is None else np.clip(m, _F32(-self.clip), _F32(self.clip))

    def step(self, i: int, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        x, out = np.asarray(x, np.float32), np.asarray(out, np.float32)
        s, steps = self.settings, len(self.plan.timesteps)
        last = i == steps - 1
        first_order = (s.solver_order == 1 or self._m_prev is None or i == 0 or
                       (last and (s.euler_at_final or (s.lower_order_final and steps < 15) or s.final_sigmas_type == "zero")))  # fmt: skip
        m = self.data_prediction(i, x, out)
        sig = self.plan.sigmas
        a_t, n_t, lam_t = _scales(sig[i + 1])
        _, n_s, lam_s = _scales(sig[i])
        h = lam_t - lam_s
        em1 = _exp(-h) - _F32(1)
        b = a_t * em1
        if first_order:
            x_next = (n_t / n_s) * x - b * m
        else:
            lam_p = _scales(sig[i - 1])[2]
            r0 = (lam_s - lam_p) / h
            d1 = (_F32(1) / r0) * (m - self._m_prev)
            if s.solver_type == "midpoint":
                x_next = (n_t / n_s) * x - b * m - (_F32(0.5) * b) * d1
            else:
                x_next = (n_t / n_s) * x - b * m + (a_t * (em1 / h + _F32(1))) * d1
        self._m_prev = m
        return x_next
