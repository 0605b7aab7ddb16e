"""The training loop of quantization-aware training for a text-conditioned flow-matching model (the
``digits-t2i`` family of models): rectified flow on images with prompts, the text encoders frozen.

The prompts are encoded once, before training, by the pipeline folder's float text encoders (a
:class:`~ditq.calib.conditioning.PromptConditioning` bank: every training paraphrase and the empty prompt);
only the transformer trains (through its quantizers, :func:`ditq.calib.qat.prepare_qat`). One step, for a
batch of images ``x0`` in [-1, 1] with labels ``y``, all drawn from one seeded ``numpy`` generator:

- each image takes one of its label's paraphrases at random, or the empty prompt with probability
  ``cfg.class_dropout`` (classifier-free guidance's unconditional input);
- ``s ~ U[0, 1)``, ``x_s = (1 - s) x0 + s eps``, the model sees the timestep ``1000 s`` (SD3's convention)
  through its family's graph inputs (:meth:`~ditq.families.FamilySpec.feeds`);
- loss ``mean((v - (eps - x0))^2)`` on the velocity ``v``.

Schedule of the learning rate, EMA, gradient clipping and the resumable checkpoint are those of
:func:`ditq.calib.train.train_dit`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ditq.adapters import adapter_for
from ditq.calib.conditioning import PromptConditioning
from ditq.calib.train import TrainConfig, TrainResult, _load_checkpoint, _save_checkpoint, optimizer_step


def train_text_flow(model: nn.Module, x: np.ndarray, y: np.ndarray, bank: PromptConditioning, prompts_of_label: Sequence[Sequence[int]],
                    cfg: TrainConfig, *, checkpoint: str | Path | None = None, progress: bool = True) -> TrainResult:  # fmt: skip
    """Train ``model`` (a flow-matching transformer of a text family) on images ``x [N, C, H, W]`` in [-1, 1]
    with labels ``y [N]``: label ``k``'s images take the prompts ``bank.prompts[i]`` for ``i`` in
    ``prompts_of_label[k]`` (module docstring)."""
    adapter = adapter_for(model)
    spec, mcfg = adapter.spec, dict(model.config)
    forward = adapter.wrap(model.float().eval())
    for p in model.parameters():
        p.requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    rng = np.random.default_rng(cfg.seed)
    start, losses = 0, []
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and ckpt.is_file():
        start, losses, rng = _load_checkpoint(ckpt, cfg, model, ema, opt)
    x_all, y_all = np.asarray(x, np.float32), np.asarray(y, np.int64)
    rows = {k: np.concatenate([v, bank.uncond[k][:1]]) for k, v in bank.cond.items()}  # the empty prompt last
    empty = len(bank.prompts)
    choices = [np.asarray(c, np.int64) for c in prompts_of_label]
    t0, window = time.perf_counter(), []
    bar = tqdm(range(start, cfg.steps), desc="train", unit="step", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        idx = rng.integers(0, len(x_all), cfg.batch_size)
        s = rng.random(cfg.batch_size).astype(np.float32)
        noise = rng.standard_normal((cfg.batch_size, *x_all.shape[1:])).astype(np.float32)
        drop = rng.random(cfg.batch_size) < cfg.class_dropout
        pick = np.array([c[rng.integers(0, len(c))] for c in (choices[k] for k in y_all[idx])], np.int64)
        pick[drop] = empty
        x0 = x_all[idx]
        sb = s.reshape(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - sb) * x0 + sb * noise
        feeds = spec.feeds(mcfg, xt, s * np.float32(1000), {k: v[pick] for k, v in rows.items()})
        out = forward(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in adapter.input_names if n in feeds))
        v = spec.prediction(mcfg, out, xt)
        loss = torch.mean((v - torch.from_numpy(noise - x0)) ** 2)
        optimizer_step(model, ema, opt, cfg, step, loss)
        window.append(loss.item())
        if len(window) == 100 or step + 1 == cfg.steps:
            losses.append(float(np.mean(window)))
            window = []
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if ckpt and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            _save_checkpoint(ckpt, cfg, step + 1, losses, rng, model, ema, opt)
    bar.close()
    return TrainResult(ema.eval(), losses, cfg.steps, time.perf_counter() - t0)
