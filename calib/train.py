"""Training a class-conditional DiT with the epsilon-prediction objective (the shipped ``digits`` model).

Seeded end to end: batches, timesteps, noise and label dropout come from one ``numpy`` generator, so a run
is reproducible on the same machine and torch version. Resumable: with ``checkpoint`` set, the model, its
exponential moving average, the optimizer and the generator state are written there (atomically) every
``save_every`` steps, and a later call with the same arguments continues from the last one.

Label dropout for classifier-free guidance is done here, once per sample, by replacing the label with
the null class: diffusers' DiT has one label embedder per block, and its built-in training-mode dropout
would drop independently in each block. The model runs in eval mode (DiT has no dropout or batch norm).
"""

from __future__ import annotations

import copy
import math
import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ditq.errors import DitqError, one_line
from ditq.files import atomic_path
from ditq.options import MAX_BATCH, MAX_TRAIN_STEPS, SEED_MAX, check_float, check_int
from ditq.schedule import NoiseSchedule


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 12000
    batch_size: int = 128
    lr: float = 5e-4
    min_lr_ratio: float = 0.05  # cosine decay to this fraction of lr
    warmup: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.9995
    class_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 500

    def __post_init__(self) -> None:
        for name, lo, hi in (("steps", 1, MAX_TRAIN_STEPS), ("batch_size", 1, MAX_BATCH), ("warmup", 0, MAX_TRAIN_STEPS),
                             ("seed", 0, SEED_MAX), ("save_every", 1, MAX_TRAIN_STEPS)):  # fmt: skip
            check_int(getattr(self, name), name, lo, hi)
        check_float(self.lr, "lr", 0.0, 1.0, open_lo=True)
        for name in ("min_lr_ratio", "weight_decay", "ema_decay", "class_dropout"):
            check_float(getattr(self, name), name, 0.0, 1.0)
        check_float(self.grad_clip, "grad_clip", 0.0, 1e6, open_lo=True)


@dataclass
class TrainResult:
    ema: nn.Module
    losses: list[float]  # mean loss of every 100 steps
    steps: int
    seconds: float


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def optimizer_step(model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, loss: torch.Tensor) -> None:
    """One step of every ditq training loop: the scheduled learning rate, backward, gradient clipping,
    AdamW, and the EMA update (decay warmed up as ``(1 + step) / (10 + step)``)."""
    for g in opt.param_groups:
        g["lr"] = _lr(cfg, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def _rng_state(rng: np.random.Generator) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(rng.bit_generator.state).encode()), dtype=torch.uint8)


def train_dit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig = TrainConfig(),
    *,
    null_class: int,
    schedule: NoiseSchedule | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` (a diffusers DiT with epsilon output) on images ``x`` [N,C,H,W] in [-1,1] and labels ``y``."""
    import time

    schedule = schedule or NoiseSchedule.linear()
    abar = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    rng = np.random.default_rng(cfg.seed)
    start, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and ckpt.is_file():
        start, losses, rng = _load_checkpoint(ckpt, cfg, model, ema, opt)
    xt_all = torch.from_numpy(np.array(x, np.float32))
    yt_all = torch.from_numpy(np.array(y, np.int64))
    n = len(xt_all)
    t0 = time.perf_counter()
    window: list[float] = []
    bar = tqdm(range(start, cfg.steps), desc="train", unit="step", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        idx = rng.integers(0, n, cfg.batch_size)
        t = rng.integers(0, schedule.num_timesteps, cfg.batch_size)
        noise = torch.from_numpy(rng.standard_normal((cfg.batch_size, *xt_all.shape[1:])).astype(np.float32))
        drop = rng.random(cfg.batch_size) < cfg.class_dropout
        x0, labels = xt_all[idx], yt_all[idx].clone()
        labels[torch.from_numpy(drop)] = null_class
        tt = torch.from_numpy(t)
        a = abar[tt].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = model(xt, timestep=tt, class_labels=labels, return_dict=False)[0]
        loss = torch.mean((out[:, : x0.shape[1]] - noise) ** 2)
        optimizer_step(model, ema, opt, cfg, step, loss)
        window.append(loss.item())
        if len(window) == 100:
            losses.append(float(np.mean(window)))
            window = []
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if ckpt and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            _save_checkpoint(ckpt, cfg, step + 1, losses, rng, model, ema, opt)
    bar.close()
    return TrainResult(ema.eval(), losses, cfg.steps, time.perf_counter() - t0)


def _save_checkpoint(path: Path, cfg, step, losses, rng, model, ema, opt, *, seconds: float | None = None) -> None:
    """Write the training state atomically (tensors, numbers, strings: loadable with ``weights_only=True``);
    ``seconds``, when given, is the training time so far (a resumed run's record adds it up)."""
    extra = {} if seconds is None else {"seconds": float(seconds)}
    state = {
        **extra,
        "config": asdict(cfg),
        "step": step,
        "losses": losses,
        "rng": _rng_state(rng),
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, cfg, model, ema, opt):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["config"] != asdict(cfg):
            raise DitqError(f"{path}: checkpoint was made with different training settings; remove it to start over")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(state["rng"].numpy().tobytes())
    except (KeyError, RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise DitqError(f"{path}: unreadable training checkpoint ({one_line(e, 200)})") from None
    return int(state["step"]), list(state["losses"]), rng
