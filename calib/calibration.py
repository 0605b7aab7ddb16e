"""Calibration data: the inputs of every covered linear, recorded along real sampling trajectories.

As Q-DiT does, the float model samples from seeded noise (DDIM, classifier-free guidance) and at a few
timesteps of every trajectory the input of each covered linear is captured with a forward hook, a
random subset of its tokens kept. The set is cached on disk as safetensors (one tensor per layer,
``[rows, K]`` float32) with its settings in the metadata, so a second run with the same settings reads
it instead of sampling again. The trajectories follow the model's own sampling: its noise schedule,
timesteps and prediction type (a :class:`~ditq.schedule.SchedulerSpec`, part of the cache's
key), so a ``v_prediction`` or otherwise non-default pipeline is calibrated on the inputs it really
sees. The same trajectories give the model's own inputs ``(x_t, t, labels)``
(:func:`record_model_inputs`), on which RobuQ measures activation sensitivity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ditq.adapters import adapter_for
from ditq.errors import DitqError
from ditq.files import atomic_path
from ditq.runtime.samplers import sample, seeded_noise
from ditq.schedule import SchedulerSpec


@dataclass(frozen=True)
class CalibConfig:
    num_samples: int = 64
    steps: int = 50
    timesteps_per_sample: int = 10  # evenly spread over the trajectory, the same for every sample
    tokens_per_call: int = 16  # tokens kept per recorded call and sample
    cfg: float = 1.5
    seed: int = 1234


def sample_trajectories(model: nn.Module, cfg: CalibConfig, before_call, *, schedule: SchedulerSpec | None = None,
                        clip_denoised: bool = True, progress: bool = True) -> None:  # fmt: skip
    """The calibration trajectories: ``cfg.num_samples`` DDIM samples of the float ``model`` from seeded
    noise, labels cycling through the classes, guidance ``cfg.cfg``, sampled as ``schedule`` says (the
    model's :attr:`~ditq.models.LoadedModel.schedule`; None: DiT's). Before every model evaluation
    ``before_call(kept, x, t, y)`` sees its inputs (numpy, the guided batch: conditional rows, then the
    null class); ``kept`` is true at ``cfg.timesteps_per_sample`` of the schedule's timesteps, spread
    over the trajectory."""
    adapter = adapter_for(model)
    mcfg = dict(model.config)
    shape, cond = adapter.sample_shape(mcfg), adapter.conditioning(mcfg)
    spec = schedule or SchedulerSpec()
    use, _ = spec.plan(cfg.steps, "ddim")  # descending, the timesteps the sampler evaluates the model at
    keep_t = set(use[np.linspace(0, len(use) - 1, cfg.timesteps_per_sample).round().astype(int)].tolist())
    torch_fn = adapter.torch_callable(model)

    def model_fn(x, t, y):
        before_call(int(t[0]) in keep_t, x, t, y)
        return torch_fn(x, t, y)

    labels = np.arange(cfg.num_samples) % cond.num_classes
    c, size, _ = shape  # seeded_noise draws square samples of c channels
    sample(model_fn, seeded_noise(cfg.seed, cfg.num_samples, c, size), labels, schedule=spec, steps=cfg.steps, method="ddim",
           cfg=cfg.cfg, null_class=cond.null_label, clip_denoised=clip_denoised, progress=progress)  # fmt: skip


def record_model_inputs(model: nn.Module, cfg: CalibConfig, *, schedule: SchedulerSpec | None = None,
                        clip_denoised: bool = True,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The model's own inputs ``(x_t [M,C,H,W], t [M], labels [M])`` at the kept timesteps of the
    calibration trajectories: every row the model evaluates there, ``M = num_samples x
    timesteps_per_sample`` (twice that with guidance: the null-class rows too)."""
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def keep(kept, x, t, y):
        if kept:
            rows.append((np.array(x, np.float32), np.array(t, np.int64), np.array(y, np.int64)))

    sample_trajectories(model, cfg, keep, schedule=schedule, clip_denoised=clip_denoised, progress=progress)
    x, t, y = (torch.from_numpy(np.concatenate(column)) for column in zip(*rows))
    return x, t, y


def record_activations(model: nn.Module, layer_names: list[str], cfg: CalibConfig, *,
                       schedule: SchedulerSpec | None = None, clip_denoised: bool = True,
                       progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """Inputs of ``layer_names`` (``[rows, K]``) at ``cfg.timesteps_per_sample`` steps of the calibration
    trajectories (:func:`sample_trajectories`)."""
    named = dict(model.named_modules())
    missing = [n for n in layer_names if n not in named]
    if missing:
        raise DitqError(f"no module {missing[0]!r} in the model")
    rng = np.random.default_rng(cfg.seed)
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}
    state = {"record": False}

    def hook(name):
        def fn(_mod, inputs):
            if not state["record"]:
                return
            x = inputs[0].detach().reshape(inputs[0].shape[0], -1, inputs[0].shape[-1])  # [B, tokens, K]
            t = x.shape[1]
            idx = torch.from_numpy(rng.choice(t, min(cfg.tokens_per_call, t), replace=False))
            store[name].append(x[:, idx].reshape(-1, x.shape[-1]).float().clone())

        return fn

    handles = [named[n].register_forward_pre_hook(hook(n)) for n in layer_names]

    def arm(kept, _x, _t, _y):
        state["record"] = kept

    try:
        sample_trajectories(model, cfg, arm, schedule=schedule, clip_denoised=clip_denoised, progress=progress)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def load_or_record(path: str | Path, model: nn.Module, layer_names: list[str], cfg: CalibConfig, *, model_digest: str,
                   schedule: SchedulerSpec | None = None, clip_denoised: bool = True,
                   progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """The cached set at ``path`` if it was made with these settings, sampling (schedule, clipping) and
    model, else record and cache it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = Path(path)
    meta = {"config": json.dumps(asdict(cfg), sort_keys=True), "model": model_digest,
            "sampling": sampling_key(schedule, clip_denoised)}  # fmt: skip
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                have = f.metadata() or {}
            if all(have.get(k) == v for k, v in meta.items()):
                data = load_file(str(path))
                if set(layer_names) <= set(data):
                    return {n: data[n] for n in layer_names}
        except (SafetensorError, OSError) as e:
            raise DitqError(f"{path}: corrupt calibration cache ({e}); remove it") from None
    data = record_activations(model, layer_names, cfg, schedule=schedule, clip_denoised=clip_denoised, progress=progress)
    with atomic_path(path) as tmp:
        save_file({n: t.contiguous() for n, t in data.items()}, str(tmp), metadata=meta)
    return data


def sampling_key(schedule: SchedulerSpec | None, clip_denoised: bool) -> str:
    """How the calibration trajectories are sampled, as the cache records it (JSON, sorted keys)."""
    return json.dumps({"schedule": (schedule or SchedulerSpec()).to_dict(), "clip_denoised": clip_denoised}, sort_keys=True)
