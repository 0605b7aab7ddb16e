"""Flow-matching schedules (rectified flow: Stable Diffusion 3, Flux), numpy only, no torch.

A sample at noise level ``sigma`` is ``x = (1 - sigma) x0 + sigma eps``; the model predicts the velocity
``v = eps - x0``, and one Euler step from ``sigma`` to the next level ``sigma'`` is ``x' = x + (sigma' -
sigma) v`` (float32, as diffusers' ``FlowMatchEulerDiscreteScheduler.step``). The model sees the timestep
``t = N sigma`` (``N = num_train_timesteps``).

:class:`FlowMatchSpec` is the scheduler's config (``ditq export`` reads ``scheduler_config.json`` with
:meth:`FlowMatchSpec.from_scheduler_config`, refusing every setting it does not implement, naming it) plus
how the pipeline spaces its steps (``grid``: the model family's ``flow_grids`` entry of
``model_index.json``'s pipeline class, :class:`ditq.families.FamilySpec`). The ``S`` sigmas
of a run (:meth:`FlowMatchSpec.plan`), in the order diffusers' ``set_timesteps`` computes them:

=================  =====================================================================================
1. grid            ``timesteps`` (diffusers' default; ``StableDiffusion3Pipeline``):
                   ``linspace(N s_max, N s_min, S) / N`` in float64, ``s_max, s_min`` the ends of the
                   training sigmas ``i / N`` (``i = N..1``, float32, statically shifted unless
                   ``use_dynamic_shifting``); ``sigmas`` (``FluxPipeline``): ``linspace(1, 1/S, S)`` as
                   float32
2. shift           static: ``s' = shift s / (1 + (shift - 1) s)``; ``use_dynamic_shifting``: ``mu = L m + b``
                   for ``L`` image tokens, ``m = (max_shift - base_shift) / (max_image_seq_len -
                   base_image_seq_len)``, ``b = base_shift - m base_image_seq_len``, then
                   ``exponential``: ``s' = e^mu / (e^mu + (1/s - 1))``, ``linear``: ``mu / (mu + (1/s - 1))``
3. shift_terminal  ``s' = 1 - (1 - s) (1 - shift_terminal) / (1 - s_last)`` (the last sigma becomes it)
4. spacing         ``use_karras_sigmas``: ``(a + r (b - a)) ** 7`` with ``a = s_first ** (1/7)``,
                   ``b = s_last ** (1/7)``, ``r = linspace(0, 1, S)``; ``use_exponential_sigmas``:
                   ``exp(linspace(log s_first, log s_last, S))`` (float64)
5. timesteps       float32 sigmas, ``t = N sigma`` (float32), and a final sigma 0
=================  =====================================================================================

Each step keeps the element type diffusers computes it in (float64 for the ``timesteps`` grid, float32 for
Flux's), so the sigmas match diffusers' to float32 rounding. Refused: ``invert_sigmas`` (Mochi's
convention), ``use_beta_sigmas`` (needs scipy's beta quantiles), ``stochastic_sampling`` (ditq's flow
sampler is the deterministic Euler step), and any setting ditq does not know.

:func:`schedule_from_config` and :func:`read_schedule` pick this spec or the DDPM family's
:class:`~ditq.schedule.SchedulerSpec` by the scheduler class.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Union

import numpy as np

from ditq.errors import DitqError, shown
from ditq.options import is_finite_real
from ditq.schedule import SchedulerSpec, check_record_fields

FLOW_CLASS = "FlowMatchEulerDiscreteScheduler"
GRIDS = ("timesteps", "sigmas")  # see the module docstring's table, row 1
TIME_SHIFTS = ("exponential", "linear")
_MAX_TIMESTEPS = 100_000
_MAX_SHIFT = 1000.0  # static shift; SD3 uses 3.0
_MAX_MU = 50.0  # |base_shift|, |max_shift|: e^50 is far past any schedule, still finite in float32 ratios
_MAX_SEQ = 1 << 24  # image tokens a dynamic shift is fitted to
_MAX_EXP = 80.0  # |mu|: e^mu stays finite in float32

# FlowMatchEulerDiscreteScheduler's settings and defaults (diffusers 0.3x-0.4x).
FLOW_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False, "shift_terminal": None,
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "time_shift_type": "exponential", "stochastic_sampling": False,
}  # fmt: skip
# Settings that must keep one value, and why the others are refused.
_ONLY_AT: dict[str, tuple[Any, str]] = {
    "invert_sigmas": (False, "inverted sigmas are Mochi's convention; ditq's flow sampler denoises from sigma 1 to 0"),
    "use_beta_sigmas": (False, "beta-distributed sigmas need scipy's beta quantiles; use karras or exponential sigmas"),
    "stochastic_sampling": (False, "ditq's flow sampler is the deterministic Euler step"),
}

Schedule = Union[SchedulerSpec, "FlowMatchSpec"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class FlowMatchSpec:
    """A flow-matching Euler schedule: the scheduler config's settings and the pipeline's step ``grid``."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    grid: str = "timesteps"
    scheduler_class: str = FLOW_CLASS  # tells a record of this spec from a SchedulerSpec's

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> DitqError:
            return DitqError(f"{name}={shown(getattr(self, name), 60, as_json=True)} is not supported ({why})")

        if not _is_int(self.num_train_timesteps) or not 1 <= self.num_train_timesteps <= _MAX_TIMESTEPS:
            raise bad("num_train_timesteps", f"an integer in 1..{_MAX_TIMESTEPS}")
        if not is_finite_real(self.shift) or not 0 < self.shift <= _MAX_SHIFT:
            raise bad("shift", f"a number in (0, {_MAX_SHIFT:g}]")
        for name in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise bad("use_exponential_sigmas", "only one of use_karras_sigmas and use_exponential_sigmas can be on")
        for name in ("base_shift", "max_shift"):
            v = getattr(self, name)
            if v is None and self.use_dynamic_shifting:
                raise bad(name, "use_dynamic_shifting needs a number")
            if v is not None and (not is_finite_real(v) or abs(v) > _MAX_MU):
                raise bad(name, f"a number in [-{_MAX_MU:g}, {_MAX_MU:g}]")
        for name in ("base_image_seq_len", "max_image_seq_len"):
            if not _is_int(getattr(self, name)) or not 0 <= getattr(self, name) <= _MAX_SEQ:
                raise bad(name, f"an integer in 0..{_MAX_SEQ}")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise bad("max_image_seq_len", "the dynamic shift divides by max_image_seq_len - base_image_seq_len")
        if self.time_shift_type not in TIME_SHIFTS:
            raise bad("time_shift_type", f"ditq implements {', '.join(TIME_SHIFTS)}")
        st = self.shift_terminal
        if st is not None and (not is_finite_real(st) or not 0 <= st < 1):
            raise bad("shift_terminal", "null or a number in [0, 1)")
        if self.grid not in GRIDS:
            raise bad("grid", f"one of {', '.join(GRIDS)}")
        if self.scheduler_class != FLOW_CLASS:
            raise bad("scheduler_class", FLOW_CLASS)

    # ------------------------------------------------------------------------------------ the schedule
    def mu(self, image_tokens: int) -> float:
        """The dynamic shift ``mu`` for ``image_tokens`` (``calculate_shift`` of the diffusers pipelines)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        b = self.base_shift - m * self.base_image_seq_len
        return image_tokens * m + b

    def _shifted_ends(self) -> tuple[float, float]:
        """``(s_max, s_min)``: the training sigmas' ends as the scheduler builds them (float32)."""
        n = self.num_train_timesteps
        ends = np.array([n, 1], np.float32) / n
        if not self.use_dynamic_shifting:
            ends = self.shift * ends / (1 + (self.shift - 1) * ends)
        return float(ends[0]), float(ends[1])

    def plan(self, steps: int, image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """``(sigmas [steps + 1], timesteps [steps])``, float32, descending, the last sigma 0, for a model
        that attends over ``image_tokens`` image tokens (the dynamic shift's ``L``)."""
        n = self.num_train_timesteps
        if not _is_int(steps) or not 1 <= steps <= _MAX_TIMESTEPS:
            raise DitqError(f"steps must be in 1..{_MAX_TIMESTEPS}, got {shown(steps)}")
        if self.grid == "sigmas":
            s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
        else:
            hi, lo = self._shifted_ends()
            s = np.linspace(hi * n, lo * n, steps) / n
        mu = self.mu(image_tokens) if self.use_dynamic_shifting else 0.0
        if not abs(mu) <= _MAX_EXP:
            raise DitqError(f"this flow-matching schedule's dynamic shift at {image_tokens} image tokens is mu {mu:.4g}, "
                            f"beyond +-{_MAX_EXP:g}: check base_shift, max_shift and the image size")  # fmt: skip
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            if self.use_dynamic_shifting:
                if self.time_shift_type == "exponential":
                    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
                else:
                    s = mu / (mu + (1 / s - 1) ** 1.0)
            else:
                s = self.shift * s / (1 + (self.shift - 1) * s)
            if self.shift_terminal:
                if steps < 2:  # the stretch divides by 1 - (the last sigma), which is 1 - 1 for one step
                    raise DitqError(f"shift_terminal={self.shift_terminal:g} stretches the sigmas between the first and the last: take 2 or more steps")
                one_minus = 1 - s
                s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
            if (self.use_karras_sigmas or self.use_exponential_sigmas) and not (np.isfinite(s).all() and s.min() > 0):
                raise DitqError("this flow-matching schedule's sigmas must be positive to space them as karras or exponential sigmas")
            if self.use_karras_sigmas:
                lo_r, hi_r = float(s[-1]) ** (1 / 7.0), float(s[0]) ** (1 / 7.0)
                s = (hi_r + np.linspace(0, 1, steps) * (lo_r - hi_r)) ** 7.0
            elif self.use_exponential_sigmas:
                s = np.exp(np.linspace(math.log(float(s[0])), math.log(float(s[-1])), steps))
        sigmas = np.asarray(s).astype(np.float32)
        if not (np.isfinite(sigmas).all() and sigmas.min() >= 0 and sigmas.max() <= 1):
            at = f" at {image_tokens} image tokens (mu {mu:.4g})" if self.use_dynamic_shifting else ""
            raise DitqError(f"this flow-matching schedule's sigmas leave [0, 1]{at}: check shift, base_shift and max_shift")
        return np.append(sigmas, np.float32(0)), sigmas * np.float32(n)

    @staticmethod
    def step(x: np.ndarray, velocity: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> np.ndarray:
        """One Euler step ``x + (sigma_next - sigma) v`` in float32 (the scheduler's ``step``)."""
        dt = np.float32(sigma_next) - np.float32(sigma)
        return np.asarray(x, np.float32) + dt * np.asarray(velocity, np.float32)

    # ------------------------------------------------------------------------------------ reading and writing
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FlowMatchSpec":
        """The record :meth:`to_dict` wrote (untrusted: every field checked by ``__post_init__``)."""
        return cls(**check_record_fields(cls, d))

    @classmethod
    def from_scheduler_config(cls, cfg: Mapping[str, Any], *, where: str = "scheduler config", pipeline_class: Any = None,
                              grids: Mapping[str, str] | None = None) -> "FlowMatchSpec":  # fmt: skip
        """The spec of a ``FlowMatchEulerDiscreteScheduler`` config sampled by ``pipeline_class`` (the
        folder's ``model_index.json`` class), whose grid ``grids`` (the model family's ``flow_grids``: pipeline
        class -> grid) gives; every setting that changes sampling is read or refused (one :class:`DitqError`
        naming it and its value)."""
        grids = grids or {}
        if cfg.get("_class_name") != FLOW_CLASS:
            raise DitqError(f"{where}: scheduler class {shown(cfg.get('_class_name'), 60, as_json=True)} is not {FLOW_CLASS}")
        if not isinstance(pipeline_class, str) or pipeline_class not in grids:
            raise DitqError(f"{where}: ditq does not know how pipeline class {shown(pipeline_class, 60, as_json=True)} spaces "
                            f"this model's flow-matching steps; it knows {', '.join(sorted(grids)) or 'none'}")  # fmt: skip
        values = dict(FLOW_DEFAULTS)
        for key, value in cfg.items():
            if key.startswith("_"):  # _class_name, _diffusers_version, ...
                continue
            if key not in values:
                raise DitqError(f"{where}: unknown scheduler setting {shown(key, 60, quote=False)}={shown(value, 60, as_json=True)} for "
                                f"{FLOW_CLASS}: ditq cannot tell how it changes sampling")  # fmt: skip
            values[key] = value
        for key, (ok, why) in _ONLY_AT.items():
            if values.pop(key) != ok:
                raise DitqError(f"{where}: {key}={shown(cfg[key], 60, as_json=True)} is not supported ({why})")
        if values["shift_terminal"] in (0, 0.0):  # diffusers: a falsy shift_terminal is off
            values["shift_terminal"] = None
        try:
            return cls(**values, grid=grids[pipeline_class])
        except DitqError as e:
            raise DitqError(f"{where}: {e}") from None


def read_schedule(d: Mapping[str, Any]) -> Schedule:
    """A schedule record (untrusted) as the spec its ``scheduler_class`` names: a flow-matching one, or
    the DDPM family's :class:`SchedulerSpec` (absent fields: DiT's)."""
    if isinstance(d, Mapping) and d.get("scheduler_class") == FLOW_CLASS:
        return FlowMatchSpec.from_dict(d)
    return SchedulerSpec.from_dict(d)


def schedule_from_config(cfg: Any, *, where: str, learned_sigma: bool | None = None, pipeline_class: Any = None,
                         grids: Mapping[str, str] | None = None) -> Schedule:  # fmt: skip
    """The spec of a diffusers ``scheduler_config.json``: :class:`FlowMatchSpec` for a flow-matching
    scheduler (``pipeline_class`` and ``grids``: :meth:`FlowMatchSpec.from_scheduler_config`), else
    :meth:`SchedulerSpec.from_scheduler_config` (which names the classes it reads)."""
    if not isinstance(cfg, Mapping):
        raise DitqError(f"{where}: expected a JSON object, got {shown(cfg, kinds=True)}")
    if cfg.get("_class_name") == FLOW_CLASS:
        return FlowMatchSpec.from_scheduler_config(cfg, where=where, pipeline_class=pipeline_class, grids=grids)
    return SchedulerSpec.from_scheduler_config(cfg, where=where, learned_sigma=learned_sigma)
