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

A text-conditioned model samples them from prompts instead of labels (a
:class:`~ditq.calib.conditioning.PromptConditioning`: prompts encoded once by the pipeline folder's float
text encoders, guided with the empty prompt), stepped by its own schedule: a flow-matching one's Euler
steps (:class:`~ditq.flow.FlowMatchSpec`) or DDIM. Its prompts and guidance scale are part of the cache's key.
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
from ditq.calib.conditioning import PromptConditioning, conditioning_key
from ditq.flow import FlowMatchSpec, Schedule
from ditq.runtime.samplers import sample, sample_flow, seeded_noise
from ditq.schedule import SchedulerSpec


@dataclass(frozen=True)
class CalibConfig:
    num_samples: int = 64
    steps: int = 50
    timesteps_per_sample: int = 10  # evenly spread over the trajectory, the same for every sample
    tokens_per_call: int = 16  # tokens kept per recorded call and sample
    cfg: float = 1.5
    seed: int = 1234


def sample_trajectories(model: nn.Module, cfg: CalibConfig, before_call, *, schedule: Schedule | None = None,
                        clip_denoised: bool = True, progress: bool = True,
                        conditioning: PromptConditioning | None = None) -> None:  # fmt: skip
    """The calibration trajectories: ``cfg.num_samples`` DDIM samples of the float ``model`` from seeded
    noise, labels cycling through the classes, guidance ``cfg.cfg``, sampled as ``schedule`` says (the
    model's :attr:`~ditq.models.LoadedModel.schedule`; None: DiT's). Before every model evaluation
    ``before_call(kept, x, t, y)`` sees its inputs (numpy, the guided batch: conditional rows, then the
    null class); ``kept`` is true at ``cfg.timesteps_per_sample`` of the schedule's timesteps, spread
    over the trajectory. A text model takes ``conditioning`` instead of labels: :func:`_sample_text`."""
    if conditioning is not None:
        return _sample_text(model, cfg, before_call, conditioning, schedule=schedule, clip_denoised=clip_denoised, progress=progress)
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


def sample_prompts(model: nn.Module, cond: PromptConditioning, *, num_samples: int, steps: int, seed: int, schedule: Schedule | None,
                   clip_denoised: bool, progress: bool = False) -> np.ndarray:  # fmt: skip
    """``num_samples`` final samples of a text model (float32, the torch ``model``: float or a quantized
    reference) on ``cond``'s prompts, exactly as its calibration trajectories are sampled (:func:`_sample_text`)."""
    return _sample_text(model, CalibConfig(num_samples=num_samples, steps=steps, seed=seed, timesteps_per_sample=1), lambda *a: None,
                        cond, schedule=schedule, clip_denoised=clip_denoised, progress=progress)  # fmt: skip


def _sample_text(model: nn.Module, cfg: CalibConfig, before_call, cond: PromptConditioning, *, schedule: Schedule | None,
                 clip_denoised: bool, progress: bool) -> np.ndarray:  # fmt: skip
    """:func:`sample_trajectories` of a text model: ``cfg.num_samples`` samples from seeded noise (numpy's
    ``default_rng(cfg.seed).standard_normal([num_samples, *sample_shape])``, float32), sample ``i`` on
    prompt ``i mod len(prompts)``, guided with the empty prompt at ``cond.guidance`` as the family's
    pipelines guide: one batch ``[empty-prompt rows, prompt rows]`` and ``p = p_empty + G (p_prompt -
    p_empty)`` on the prediction channels (a guidance-distilled model takes ``G`` as its input instead; a
    family without negative-prompt guidance, or ``G <= 1``: the prompt rows only), stepped by the model's
    own schedule: a flow-matching one's Euler steps (no clipping), else DDIM (``clip_denoised``). Before
    every model evaluation ``before_call(kept, *inputs)`` sees the graph's inputs (numpy, in the family
    adapter's ``input_names`` order), ``kept`` as in :func:`sample_trajectories`. Returns the final samples."""
    adapter = adapter_for(model)
    spec, mcfg = adapter.spec, dict(model.config)
    torch_fn = adapter.torch_callable(model)
    n, g = cfg.num_samples, cond.guidance
    noise = np.random.default_rng(cfg.seed).standard_normal((n, *adapter.sample_shape(mcfg))).astype(np.float32)
    rows, empty = cond.rows(n)
    probe = spec.feeds(mcfg, noise[:1], np.ones(1, np.float32), {k: v[:1] for k, v in rows.items()}, g)
    distilled = "guidance" in probe  # the graph takes the guidance scale
    paired = not distilled and spec.negative_prompt_guidance and g > 1
    p, var = spec.output_split(mcfg)

    def guided(x: np.ndarray, t: np.ndarray, kept: bool) -> np.ndarray:
        b = len(x)
        xs, ts, c = (np.concatenate([x, x]), np.concatenate([t, t]), {k: np.concatenate([empty[k], rows[k]]) for k in rows}) if paired else (x, t, rows)
        feeds = spec.feeds(mcfg, xs, ts, c, g if distilled else None)
        inputs = [feeds[name] for name in adapter.input_names if name in feeds]
        before_call(kept, *inputs)
        out = np.asarray(torch_fn(*inputs))
        pred = spec.prediction(mcfg, out, xs)
        out = np.concatenate([pred, out[:, p : p + var]], axis=1) if var else pred
        if not paired:
            return out
        u, c_ = out[:b], out[b:]
        mixed = u[:, :p] + g * (c_[:, :p] - u[:, :p])
        return np.concatenate([mixed, c_[:, p:]], axis=1) if out.shape[1] > p else mixed

    if isinstance(schedule, FlowMatchSpec):
        tokens = spec.image_tokens(mcfg)
        _, ts = schedule.plan(cfg.steps, tokens)
        keep_t = set(ts[np.linspace(0, len(ts) - 1, cfg.timesteps_per_sample).round().astype(int)].tolist())
        return sample_flow(lambda x, t: guided(x, np.full(len(x), t, np.float32), float(t) in keep_t), noise, schedule=schedule,
                           steps=cfg.steps, image_tokens=tokens, progress=progress)  # fmt: skip
    ddim = schedule or SchedulerSpec()
    use, _ = ddim.plan(cfg.steps, "ddim")
    keep_t = set(use[np.linspace(0, len(use) - 1, cfg.timesteps_per_sample).round().astype(int)].tolist())
    return sample(lambda x, t, _y: guided(x, t, int(t[0]) in keep_t), noise, np.zeros(n, np.int64), schedule=ddim, steps=cfg.steps,
                  method="ddim", clip_denoised=clip_denoised, progress=progress)  # fmt: skip


def record_model_inputs(model: nn.Module, cfg: CalibConfig, *, schedule: Schedule | None = None,
                        clip_denoised: bool = True, progress: bool = False,
                        conditioning: PromptConditioning | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The model's own inputs at the kept timesteps of the calibration trajectories, one tensor per graph
    input in its family adapter's order (class models: ``(x_t [M,C,H,W], t [M], labels [M])``; text models,
    ``conditioning`` given: their graph's inputs, e.g. SD3's ``(x_t, encoder_hidden_states,
    pooled_projections, t)``): every row the model evaluates there, ``M = num_samples x
    timesteps_per_sample`` (twice that with guidance: the null-class or empty-prompt rows too)."""
    rows: list[tuple[np.ndarray, ...]] = []
    dtypes = (np.float32, np.int64, np.int64) if conditioning is None else adapter_for(model).input_dtypes

    def keep(kept, *inputs):
        if kept:
            rows.append(tuple(np.array(a, dtypes[i] if i < len(dtypes) else np.float32) for i, a in enumerate(inputs)))

    sample_trajectories(model, cfg, keep, schedule=schedule, clip_denoised=clip_denoised, progress=progress, conditioning=conditioning)
    return tuple(torch.from_numpy(np.concatenate(column)) for column in zip(*rows))


def record_activations(model: nn.Module, layer_names: list[str], cfg: CalibConfig, *,
                       schedule: Schedule | None = None, clip_denoised: bool = True, progress: bool = True,
                       conditioning: PromptConditioning | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Inputs of ``layer_names`` (``[rows, K]``) at ``cfg.timesteps_per_sample`` steps of the calibration
    trajectories (:func:`sample_trajectories`; a text model's on ``conditioning``'s prompts)."""
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

    def arm(kept, *_inputs):
        state["record"] = kept

    try:
        sample_trajectories(model, cfg, arm, schedule=schedule, clip_denoised=clip_denoised, progress=progress,
                            conditioning=conditioning)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def load_or_record(path: str | Path, model: nn.Module, layer_names: list[str], cfg: CalibConfig, *, model_digest: str,
                   schedule: Schedule | None = None, clip_denoised: bool = True, progress: bool = True,
                   conditioning: PromptConditioning | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The cached set at ``path`` if it was made with these settings, sampling (schedule, clipping, a text
    model's prompts and guidance) and model, else record and cache it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = Path(path)
    meta = {"config": json.dumps(asdict(cfg), sort_keys=True), "model": model_digest,
            "sampling": sampling_key(schedule, clip_denoised, conditioning)}  # fmt: skip
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
    data = record_activations(model, layer_names, cfg, schedule=schedule, clip_denoised=clip_denoised, progress=progress,
                              conditioning=conditioning)  # fmt: skip
    with atomic_path(path) as tmp:
        save_file({n: t.contiguous() for n, t in data.items()}, str(tmp), metadata=meta)
    return data


def sampling_key(schedule: Schedule | None, clip_denoised: bool, conditioning: PromptConditioning | None = None) -> str:
    """How the calibration trajectories are sampled, as the cache records it (JSON, sorted keys): the
    schedule, the clipping and, for a text model, its prompts and guidance (:meth:`PromptConditioning.key`)."""
    key = {"schedule": (schedule or SchedulerSpec()).to_dict(), "clip_denoised": clip_denoised}
    text = conditioning_key(conditioning)
    if text is not None:
        key["conditioning"] = json.loads(text)
    return json.dumps(key, sort_keys=True)
