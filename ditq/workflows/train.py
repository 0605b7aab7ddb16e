"""``ditq train-digits`` as a library: train the digit judge and the shipped ``digits`` DiT from scratch.

The judge is a scikit-learn MLP on the digits training split (:mod:`ditq.calib.digits`), written as
safetensors layers; the DiT trains with :func:`ditq.calib.train.train_dit` (seeded, resumable) and is
written as a diffusers folder (float16 safetensors, config.json, training.json, manifest.json).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from sklearn.neural_network import MLPClassifier

from ditq.calib.digits import SPLIT_SEED, load_split, to_unit_range
from ditq.calib.train import TrainConfig, train_dit
from ditq.errors import DitqError, shown
from ditq.files import atomic_path, check_out_dir, staged_dir
from ditq.manifest import write_manifest
from ditq.models import BUILTIN, BUILTIN_PIPELINE, build_dit, digits_config
from ditq.runtime.metrics import default_judge_path

JUDGE_HIDDEN = (256, 64)


def train_digits_model(out_dir: str | Path, cfg: TrainConfig | None = None, *, checkpoint: str | Path | None = None,
                       progress: bool = True, force: bool = False) -> dict:  # fmt: skip
    """Train the ``digits`` DiT from scratch and write it as a diffusers folder (float16 safetensors,
    config.json, training.json, manifest.json) to ``out_dir``, which replaces, atomically, only an empty
    folder or an earlier ditq output (see :mod:`ditq.files`). Returns the training record (training.json)."""
    cfg = cfg or TrainConfig()
    protect = [Path(checkpoint)] if checkpoint else []
    check_out_dir(out_dir, protect=protect, force=force)  # before the training, not after
    split = load_split()
    model = build_dit(digits_config(), seed=cfg.seed)
    result = train_dit(model, split.x_train, split.y_train, cfg, null_class=BUILTIN_PIPELINE["digits"].conditioning.null_label,
                       checkpoint=checkpoint, progress=progress)  # fmt: skip
    with staged_dir(out_dir, protect=protect, force=force) as stage:
        torch.nn.Module.half(result.ema).save_pretrained(stage, safe_serialization=True)
        record = {
            "data": f"scikit-learn load_digits: {len(split.x_train)} training images, {len(split.x_test)} held out "
            f"(stratified, seed {SPLIT_SEED}); pixels 0..16 -> [-1, 1]",
            "train_config": asdict(cfg),
            "parameters": sum(p.numel() for p in result.ema.parameters()),
            "loss_per_100_steps": [round(x, 5) for x in result.losses],
            "seconds": round(result.seconds, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        }
        (stage / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        write_manifest(stage, {"kind": "digits-model"})
    return record


def train_judge(out_file: str | Path, *, seed: int = 0) -> dict:
    """Train the digit judge (scikit-learn MLP on the training split) and write its layers as safetensors
    (``w0, b0, w1, b1, ...``; the last hidden layer is the FID-digits feature space). Returns its record."""
    split = load_split()
    flat = lambda x: to_unit_range(x).reshape(len(x), -1)  # noqa: E731
    clf = MLPClassifier(hidden_layer_sizes=JUDGE_HIDDEN, alpha=1e-3, max_iter=500, random_state=seed)
    clf.fit(flat(split.x_train), split.y_train)
    tensors = {}
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        tensors[f"w{i}"], tensors[f"b{i}"] = w.astype(np.float32), b.astype(np.float32)
    acc = float(clf.score(flat(split.x_test), split.y_test))
    with atomic_path(out_file) as tmp:
        save_file(tensors, str(tmp), metadata={"held_out_accuracy": f"{acc:.4f}", "hidden": str(JUDGE_HIDDEN)})
    return {"held_out_accuracy": acc, "hidden": list(JUDGE_HIDDEN)}


@dataclass(frozen=True)
class DigitsTraining:
    judge_path: Path
    judge_accuracy: float  # on the held-out digits
    out_dir: Path | None = None  # the DiT's folder (None: judge only)
    parameters: int | None = None
    steps: int | None = None
    seconds: float | None = None
    final_loss: float | None = None  # mean of the last 100 steps (NaN when fewer were run)


def train_digits(out: str | Path | None = None, config: TrainConfig = TrainConfig(steps=6000), *,
                 checkpoint: str | Path | None = None, judge_only: bool = False, force: bool = False,
                 progress: bool = False) -> DigitsTraining:  # fmt: skip
    """Train the judge (written where :class:`~ditq.runtime.metrics.DigitJudge` reads it), then, unless
    ``judge_only``, the digits DiT into ``out`` (default: the shipped ``ditq/assets/digits``), whose
    folder is checked before anything is trained."""
    if not isinstance(config, TrainConfig):
        raise DitqError(f"config: expected a TrainConfig, got {shown(config)}")
    out = Path(out) if out is not None else BUILTIN["digits"]
    if not judge_only:  # before anything is trained or written
        check_out_dir(out, protect=[checkpoint] if checkpoint else [], force=force)
    judge = train_judge(default_judge_path())
    if judge_only:
        return DigitsTraining(default_judge_path(), judge["held_out_accuracy"])
    rec = train_digits_model(out, config, checkpoint=checkpoint, progress=progress, force=force)
    losses = rec["loss_per_100_steps"]
    return DigitsTraining(default_judge_path(), judge["held_out_accuracy"], out, rec["parameters"], config.steps,
                          rec["seconds"], losses[-1] if losses else math.nan)  # fmt: skip
