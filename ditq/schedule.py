"""The noise schedule of a model and the settings its samplers follow (numpy only, no torch).

:class:`SchedulerSpec` is the one description of sampling: ``ditq export`` reads it from a diffusers
scheduler config (:meth:`SchedulerSpec.from_scheduler_config`, which refuses every setting the samplers do
not implement, naming it), stores it in the model's metadata (:meth:`~SchedulerSpec.to_dict`), and
``ditq sample`` reads it back (:meth:`~SchedulerSpec.from_dict`). Both run the same validation
(``__post_init__``), so a model that exports also samples. Without a config (presets, DiT checkpoints, the
shipped models) the spec is DiT's: ``SchedulerSpec()``.

Training schedule, ``N = num_train_timesteps``, ``abar_t = prod_{s <= t} (1 - beta_s)``:

=====================  ====================================================================================
``linear``             ``beta = linspace(beta_start, beta_end, N)``
``scaled_linear``      ``beta = linspace(sqrt(beta_start), sqrt(beta_end), N) ** 2``
``squaredcos_cap_v2``  ``beta_i = min(1 - f((i + 1) / N) / f(i / N), 0.999)``, ``f(s) = cos((s + 0.008) / 1.008 * pi / 2) ** 2``
``trained_betas``      the listed betas (overrides ``beta_schedule``)
=====================  ====================================================================================

``rescale_betas_zero_snr`` then shifts ``sqrt(abar)`` so that its last value is 0 and scales it so that its
first is unchanged (Lin et al., "Common diffusion noise schedules and sample steps are flawed", Alg. 1).

Model output ``o`` at ``x = x_t``, ``a = abar_t`` -> predicted ``x0`` and ``eps``:

================  =================================  ===================================
``epsilon``       ``x0 = (x - sqrt(1 - a) o) / sqrt(a)``  ``eps = o``
``v_prediction``  ``x0 = sqrt(a) x - sqrt(1 - a) o``      ``eps = sqrt(a) o + sqrt(1 - a) x``
``sample``        ``x0 = o``                              ``eps = (x - sqrt(a) x0) / sqrt(1 - a)``
================  =================================  ===================================

``clip_sample`` clamps ``x0`` to ``[-clip_sample_range, clip_sample_range]``; ``use_clipped_model_output``
recomputes ``eps`` from the clamped ``x0`` (DiT does; diffusers' DiT pipeline does not).

Timesteps of ``S`` sampling steps (descending) and the timestep each step moves to ("previous"):

============  ====================================================  ===============  ===============
spacing       timesteps                                             previous, DDIM   previous, DDPM
============  ====================================================  ===============  ===============
``dit``       DiT's respacing: every ``N/S``-th from 0 when ``S``   next timestep    next timestep
              divides ``N``, else ``round(linspace(0, N - 1, S))``
``leading``   ``arange(S) * (N // S) + steps_offset``               ``t - N // S``   next timestep
``trailing``  ``round(arange(N, 0, -N / S)) - 1``                   ``t - N // S``   next timestep
``linspace``  ``round(linspace(0, N - 1, S))``                      ``t - N // S``   next timestep
============  ====================================================  ===============  ===============

A previous timestep below 0 is the end: ``abar_prev = 1`` (DDIM with ``set_alpha_to_one`` false:
``abar_0``). These are the rules of diffusers' ``DDIMScheduler`` and ``DDPMScheduler``; ``dit`` is DiT's.
DPM-Solver++ (``dpm++2m``, the default sampler of a ``DPMSolverMultistepScheduler`` config whose solver ditq
implements: :attr:`SchedulerSpec.dpm_solver`) has its own timesteps and steps: :mod:`ditq.dpm_solver`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, Mapping

import numpy as np

from ditq.dpm_solver import SAMPLER as DPM_SAMPLER, DPMPlan, DPMSolverSettings, alphas_cumprod_f32, dpm_plan
from ditq.errors import DitqError, shown
from ditq.options import is_finite_real

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("dit", "leading", "trailing", "linspace")
# DDPM variance: fixed_small(_log) = posterior variance, fixed_large = beta, learned_range = DiT's learned
# sigma (needs a model with variance channels); None = learned_range when the model has them, else fixed_small
VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "learned_range")

# Scheduler classes whose configs ditq reads, with diffusers' defaults for the settings it accepts. ditq
# samples with its own DDIM, DDPM (the spec's rules) or DPM-Solver++ (ditq.dpm_solver); a config's class
# decides these defaults, and a DPMSolverMultistepScheduler's makes DPM-Solver++ the default sampler.
_COMMON: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "steps_offset": 0,
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
}  # fmt: skip
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_COMMON, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True},
    "DDPMScheduler": {**_COMMON, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0, "variance_type": "fixed_small"},
    "DPMSolverMultistepScheduler": {**_COMMON, "timestep_spacing": "linspace", "variance_type": None,
                                    "use_flow_sigmas": False, "use_dynamic_shifting": False},
}  # fmt: skip
# Settings of DPMSolverMultistepScheduler's own solver: read into SchedulerSpec.dpm_solver when ditq implements
# the solver they describe (DPMSolverSettings.from_scheduler_config); otherwise the config is refused.
SOLVER_ONLY: dict[str, frozenset[str]] = {
    "DPMSolverMultistepScheduler": frozenset({
        "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
        "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped",
        "flow_shift", "time_shift_type",
    })
}  # fmt: skip
# Accepted settings that must keep one value (why the others are refused).
_ONLY_AT: dict[str, tuple[Any, str]] = {
    "thresholding": (False, "dynamic thresholding is not implemented; clip_sample is"),
    "use_flow_sigmas": (False, "flow-matching sigmas are not a DDPM noise schedule"),
    "use_dynamic_shifting": (False, "timestep shifting belongs to flow-matching models"),
}
_MAX_TIMESTEPS = 100_000


def check_record_fields(cls: type, d: Any) -> Mapping[str, Any]:
    """``d``, an untrusted schedule record, when it is a JSON object naming only fields of the dataclass
    ``cls``; one :class:`DitqError` otherwise."""
    if not isinstance(d, Mapping):
        raise DitqError(f"the schedule record is not a JSON object: {shown(d, 60, as_json=True)}")
    names = {f.name for f in fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        raise DitqError(f"unknown schedule field {shown(unknown[0], 60, quote=False)}={shown(d[unknown[0]], 60, as_json=True)} (written by a newer ditq?)")
    return d


def dit_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """DiT's respacing: ``steps`` evenly spaced original timesteps, ascending, starting at 0."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if num_timesteps % steps == 0:
        return np.arange(0, num_timesteps, num_timesteps // steps, dtype=np.int64)
    return np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete diffusion process given by its betas (float64)."""

    betas: np.ndarray

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """DiT's schedule (the betas scale with 1000/num_timesteps, as in ``get_named_beta_schedule``)."""
        scale = 1000 / num_timesteps
        return cls(np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    def timesteps(self, steps: int) -> np.ndarray:
        """``steps`` evenly spaced original timesteps, ascending, starting at 0 (DiT's ``ddimN`` spacing)."""
        return dit_timesteps(self.num_timesteps, steps)


def _betas(spec: "SchedulerSpec") -> np.ndarray:
    n = spec.num_train_timesteps
    if spec.trained_betas is not None:
        betas = np.asarray(spec.trained_betas, np.float64)
    elif spec.beta_schedule == "linear":
        betas = np.linspace(spec.beta_start, spec.beta_end, n, dtype=np.float64)
    elif spec.beta_schedule == "scaled_linear":
        betas = np.linspace(spec.beta_start**0.5, spec.beta_end**0.5, n, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2 (GLIDE's cosine schedule)
        f = np.cos((np.arange(n + 1, dtype=np.float64) / n + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    if spec.rescale_betas_zero_snr:
        root = np.sqrt(np.cumprod(1.0 - betas))
        root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
        abar = root**2
        betas = 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return betas


@dataclass(frozen=True)
class SchedulerSpec:
    """How to sample a model: its training noise schedule and the sampler settings (module docstring)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "dit"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    use_clipped_model_output: bool = True
    variance_type: str | None = None
    scheduler_class: str | None = None  # the diffusers config's class; None: DiT's conventions
    dpm_solver: DPMSolverSettings | None = None  # the DPM-Solver++ its config asks for; None: DDIM by default

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> DitqError:
            return DitqError(f"{name}={shown(getattr(self, name), 60, as_json=True)} is not supported ({why})")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and is_finite_real(v)

        if not is_int(self.num_train_timesteps) or not 2 <= self.num_train_timesteps <= _MAX_TIMESTEPS:
            raise bad("num_train_timesteps", f"an integer in 2..{_MAX_TIMESTEPS}")
        for name in ("rescale_betas_zero_snr", "set_alpha_to_one", "clip_sample", "use_clipped_model_output"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.trained_betas is None:
            if self.beta_schedule not in BETA_SCHEDULES:
                raise bad("beta_schedule", f"ditq implements {', '.join(BETA_SCHEDULES)}")
            for name in ("beta_start", "beta_end"):
                if not is_num(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                    raise bad(name, "a number in [0, 1)")
        else:
            tb = self.trained_betas
            if not isinstance(tb, tuple) or not all(is_num(b) for b in tb) or len(tb) != self.num_train_timesteps:
                raise bad("trained_betas", f"a list of num_train_timesteps ({self.num_train_timesteps}) numbers")
        if self.prediction_type not in PREDICTION_TYPES:
            raise bad("prediction_type", f"ditq implements {', '.join(PREDICTION_TYPES)}")
        if self.timestep_spacing not in SPACINGS:
            raise bad("timestep_spacing", f"ditq implements {', '.join(SPACINGS[1:])}")
        if not is_int(self.steps_offset) or not 0 <= self.steps_offset < self.num_train_timesteps:
            raise bad("steps_offset", f"an integer in 0..{self.num_train_timesteps - 1}")
        if not is_num(self.clip_sample_range) or self.clip_sample_range <= 0:
            raise bad("clip_sample_range", "a positive number")
        if self.variance_type not in VARIANCE_TYPES:
            raise bad("variance_type", f"ditq's DDPM implements {', '.join(str(v) for v in VARIANCE_TYPES[1:])}")
        if self.dpm_solver is not None and not isinstance(self.dpm_solver, DPMSolverSettings):
            raise bad("dpm_solver", "null or the settings of ditq's DPM-Solver++")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise bad("rescale_betas_zero_snr", "an epsilon model cannot predict x0 at zero SNR; it needs v_prediction or sample")
        betas = self.betas  # zero terminal SNR makes the last beta exactly 1
        top_ok = betas.max() <= 1 if self.rescale_betas_zero_snr else betas.max() < 1
        if not np.isfinite(betas).all() or betas.min() <= 0 or not top_ok:
            name = "trained_betas" if self.trained_betas is not None else "beta_schedule"
            raise bad(name, "its betas must lie in (0, 1)")

    # ------------------------------------------------------------------------------------ the schedule
    @cached_property
    def noise(self) -> NoiseSchedule:
        return NoiseSchedule(_betas(self))

    @property
    def betas(self) -> np.ndarray:
        return self.noise.betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return self.noise.alphas_cumprod

    @property
    def num_timesteps(self) -> int:
        return self.num_train_timesteps

    @property
    def default_sampler(self) -> str:
        """The sampler the model's scheduler config asks for: ``dpm++2m`` with :attr:`dpm_solver`, else ``ddim``."""
        return DPM_SAMPLER if self.dpm_solver is not None else "ddim"

    def dpm_plan(self, steps: int) -> DPMPlan:
        """The timesteps and sigmas of ``steps`` steps of DPM-Solver++ (:func:`ditq.dpm_solver.dpm_plan`; DiT's
        spacing takes the scheduler's default, ``linspace``)."""
        abar = alphas_cumprod_f32(self.betas, self.rescale_betas_zero_snr)
        return dpm_plan(abar, steps, spacing=self.timestep_spacing, steps_offset=self.steps_offset,
                        settings=self.dpm_solver or DPMSolverSettings(), round_karras=self.beta_schedule != "squaredcos_cap_v2")  # fmt: skip

    def plan(self, steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps, previous)`` of ``steps`` steps of ``method`` (``ddim``/``ddpm``/``dpm++2m``),
        descending; ``previous`` -1 is the end (see the module docstring's table)."""
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise DitqError(f"steps must be in 1..{n} (the timesteps of this model's noise schedule), got {steps}")
        if method == DPM_SAMPLER:
            ts = self.dpm_plan(steps).timesteps
            return ts, np.append(ts[1:], -1)
        spacing = self.timestep_spacing
        if spacing == "dit":
            ts = dit_timesteps(n, steps)[::-1].copy()
        elif spacing == "leading":
            ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + self.steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        if ts.max() >= n:
            raise DitqError(f"{steps} steps with steps_offset {self.steps_offset} reach timestep {ts.max()}, "
                            f"past this model's last ({n - 1}): take fewer steps")  # fmt: skip
        if method == "ddim" and spacing != "dit":
            prev = ts - n // steps
        else:
            prev = np.append(ts[1:], -1)
        return ts, prev

    def predict(self, x: np.ndarray, out: np.ndarray, abar: float) -> tuple[np.ndarray, np.ndarray]:
        """``(x0, eps)`` from the model output ``out`` at ``x`` with ``abar`` (the prediction-type table)."""
        a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
        if self.prediction_type == "epsilon":
            return (x - s * out) / a, out
        if self.prediction_type == "v_prediction":
            return a * x - s * out, a * out + s * x
        return out, (x - a * out) / s

    # ------------------------------------------------------------------------------------ reading and writing
    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (``trained_betas`` as a list)."""
        d = asdict(self)
        if self.trained_betas is not None:
            d["trained_betas"] = list(self.trained_betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SchedulerSpec":
        """The record :meth:`to_dict` wrote; absent fields take DiT's defaults (records of ditq 0.1 hold only
        the four beta fields)."""
        d = dict(check_record_fields(cls, d))
        if isinstance(d.get("trained_betas"), list):
            d["trained_betas"] = tuple(d["trained_betas"])
        if isinstance(d.get("dpm_solver"), Mapping):
            d["dpm_solver"] = DPMSolverSettings(**check_record_fields(DPMSolverSettings, d["dpm_solver"]))
        return cls(**d)

    @classmethod
    def from_scheduler_config(
        cls, cfg: Mapping[str, Any], *, where: str = "scheduler config", learned_sigma: bool | None = None
    ) -> "SchedulerSpec":
        """The spec of a diffusers ``scheduler_config.json``; every setting that changes sampling is read or
        refused (a :class:`DitqError` naming it and its value), except a ``DPMSolverMultistepScheduler``'s
        solver settings: read into :attr:`dpm_solver`, refused when ditq does not implement that solver. ``learned_sigma``: whether the model outputs
        variance channels (``variance_type: learned_range`` needs them)."""
        name = cfg.get("_class_name")
        if not isinstance(name, str) or name not in CLASS_DEFAULTS:
            raise DitqError(f"{where}: scheduler class {shown(name, 60, as_json=True)} is not supported; ditq reads configs of "
                            f"{', '.join(CLASS_DEFAULTS)}")  # fmt: skip
        values = dict(CLASS_DEFAULTS[name])
        for key, value in cfg.items():
            if key.startswith("_") or key in SOLVER_ONLY.get(name, ()):  # _class_name, _diffusers_version, ...
                continue
            if key not in values:
                raise DitqError(f"{where}: unknown scheduler setting {shown(key, 60, quote=False)}={shown(value, 60, as_json=True)} for {name}: "
                                "ditq cannot tell how it changes sampling")  # fmt: skip
            values[key] = value
        for key, (ok, why) in _ONLY_AT.items():
            if key in values and values[key] != ok:
                raise DitqError(f"{where}: {key}={shown(values[key], 60, as_json=True)} is not supported ({why})")
        if isinstance(values["trained_betas"], list):
            values["trained_betas"] = tuple(values["trained_betas"])
        if values["timestep_spacing"] == "dit":
            raise DitqError(f"{where}: timestep_spacing=\"dit\" is not a diffusers setting (leading, trailing, linspace)")
        if values.get("variance_type") == "learned_range" and learned_sigma is False:
            raise DitqError(f"{where}: variance_type=\"learned_range\" needs a model that predicts variance; "
                            "this transformer's out_channels equal its in_channels")  # fmt: skip
        kept = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        try:
            dpm = DPMSolverSettings.from_scheduler_config(cfg) if name == "DPMSolverMultistepScheduler" else None
            return cls(**kept, use_clipped_model_output=False, scheduler_class=name, dpm_solver=dpm)
        except DitqError as e:
            raise DitqError(f"{where}: {e}") from None
