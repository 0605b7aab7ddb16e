"""Training: the loss goes down, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditq.calib.train import TrainConfig, train_dit
from ditq.errors import DitqError
from ditq.models import build_dit, dit_config


def _tiny():
    return build_dit(dit_config(32, 1, 2, in_channels=1, out_channels=1, sample_size=4, num_classes=3), seed=0)


def _data(n=64):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = np.stack([np.full((1, 4, 4), c - 1.0) for c in y]).astype(np.float32)  # class c -> constant image
    return x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), y


def test_loss_decreases():
    x, y = _data()
    cfg = TrainConfig(steps=300, batch_size=32, lr=2e-3, warmup=20, seed=0)
    res = train_dit(_tiny(), x, y, cfg, null_class=3, progress=False)
    assert len(res.losses) == 3
    assert res.losses[-1] < 0.7 * res.losses[0]


def test_resume_after_interruption_gives_identical_weights(tmp_path, monkeypatch):
    """A run killed right after its step-3 checkpoint, restarted with the same arguments, ends with
    exactly the weights of an uninterrupted run (batches, noise and label dropout are seeded state)."""
    import ditq.calib.train as train_mod

    x, y = _data()
    cfg = TrainConfig(steps=6, batch_size=8, warmup=2, save_every=3, seed=1)
    straight = train_dit(_tiny(), x, y, cfg, null_class=3, progress=False).ema.state_dict()

    ckpt = tmp_path / "run.pt"
    real_save = train_mod._save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_dit(_tiny(), x, y, cfg, null_class=3, checkpoint=ckpt, progress=False)
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    resumed = train_dit(_tiny(), x, y, cfg, null_class=3, checkpoint=ckpt, progress=False)
    assert resumed.steps == 6 and torch.load(ckpt, weights_only=True)["step"] == 6
    got = resumed.ema.state_dict()
    for k in straight:
        torch.testing.assert_close(got[k], straight[k], rtol=0, atol=0)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    x, y = _data()
    ckpt = tmp_path / "run.pt"
    train_dit(_tiny(), x, y, TrainConfig(steps=2, batch_size=4, save_every=1), null_class=3, checkpoint=ckpt, progress=False)
    with pytest.raises(DitqError, match="different training settings"):
        train_dit(_tiny(), x, y, TrainConfig(steps=2, batch_size=8), null_class=3, checkpoint=ckpt, progress=False)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(DitqError, match="unreadable training checkpoint"):
        train_dit(_tiny(), x, y, TrainConfig(steps=2, batch_size=4, save_every=1), null_class=3, checkpoint=ckpt, progress=False)
