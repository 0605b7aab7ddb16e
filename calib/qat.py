"""Quantization-aware training (RobuQ): fine-tune a DiT through its quantizers with straight-through
estimators, from the float weights.

Every linear the recipe covers becomes a :class:`QATLinear` for the duration of training. Its forward is
the layer as exported (Hadamard rotation of input and weight when the recipe rotates, the recipe's
dynamic activation quantizer, ternary or RTN weights), and its backward passes gradients straight
through both quantizers (``x + (q(x) - x).detach()``) to the float weights, which stay the trained
parameters. A :class:`QATLinear` is an ``nn.Linear`` with the same parameters, so the trained model
saves as a plain diffusers DiT; ``ditq export --recipe`` then quantizes it exactly as at training time.
The loop is :func:`ditq.calib.train.train_dit` (seeded, resumable, progress bar, EMA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.calib.numerics import fake_quantize, quantize_rtn
from ditq.calib.robuq import quantize_ternary, rotate
from ditq.manifest import PIPELINE_FILE, RECIPE_FILE, write_manifest
from ditq.models import source_paths
from ditq.recipe import LayerPlan, Recipe
from ditq.schedule import NoiseSchedule

if TYPE_CHECKING:
    from ditq.models import LoadedModel


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


class QATLinear(nn.Linear):
    """``nn.Linear`` computing its quantized forward with straight-through gradients."""

    def __init__(self, linear: nn.Linear, plan: LayerPlan):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight = linear.weight
        self.bias = linear.bias
        self.plan = plan

    def quantized_weight(self) -> torch.Tensor:
        p, q = self.plan, self.plan.quant
        w = rotate(self.weight, p.rotation) if p.rotation else self.weight
        with torch.no_grad():
            qt = quantize_ternary(w, p.group_size) if q.ternary else quantize_rtn(w, q.wbits, p.group_size, q.symmetric)
            deq = qt.dequantize().to(w.dtype)
        return _ste(w, deq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.plan
        if p.rotation:
            x = rotate(x, p.rotation)
        if p.abits is not None:
            with torch.no_grad():
                xq = fake_quantize(x, p.abits, p.activation_group, p.activation_symmetric)
            x = _ste(x, xq)
        return F.linear(x, self.quantized_weight(), self.bias)


def prepare_qat(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Swap every covered linear of ``model`` (in place) for a :class:`QATLinear`; returns the model."""
    plans = recipe.resolve(model)
    named = dict(model.named_modules())
    for name, plan in plans.items():
        if plan.kind != "linear":
            continue
        parent, _, attr = name.rpartition(".")
        setattr(named[parent] if parent else model, attr, QATLinear(named[name], plan))
    return model


def strip_qat(model: nn.Module) -> nn.Module:
    """Swap every :class:`QATLinear` back to a plain ``nn.Linear`` with the same parameters (in place)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QATLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight, lin.bias = mod.weight, mod.bias
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, lin)
    return model


def diffusion_loss(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The epsilon-prediction loss at given timesteps and noise (for evaluation on a fixed batch)."""
    abar = torch.tensor(NoiseSchedule.linear().alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = model(xt, timestep=t, class_labels=labels, return_dict=False)[0]
    return torch.mean((out[:, : x0.shape[1]] - noise) ** 2)


def run_qat(model_spec: str, recipe: Recipe, out_dir, cfg, *, checkpoint=None, progress: bool = True, force: bool = False,
            loaded: LoadedModel | None = None) -> dict:  # fmt: skip
    """QAT of ``model_spec`` (a digits model: the data are scikit-learn's digits) under ``recipe``; writes a
    diffusers folder with the trained float weights, ``recipe.json``, its sampling pipeline and a manifest
    (``out_dir`` replaces only an empty folder or an earlier ditq output, see :mod:`ditq.files`).
    ``loaded``: ``model_spec`` as :func:`~ditq.models.load_model` gave it, when the caller holds it already."""
    import json
    import time
    from dataclasses import asdict
    from pathlib import Path

    from ditq.calib.digits import load_split
    from ditq.calib.train import train_dit
    from ditq.errors import DitqError
    from ditq.files import check_out_dir, staged_dir
    from ditq.models import load_model

    if loaded is None:
        loaded = load_model(model_spec)
    pipe = loaded.pipeline
    if pipe.get("judge") != "digits":
        raise DitqError(f"{model_spec}: ditq qat trains on scikit-learn's digits; this model is not a digits model")
    protect = source_paths(loaded.source) + ([Path(checkpoint)] if checkpoint else [])
    check_out_dir(out_dir, protect=protect, force=force)  # before the training, not after
    split = load_split()
    model = prepare_qat(loaded.model, recipe)
    t0 = time.perf_counter()
    result = train_dit(model, split.x_train, split.y_train, cfg, null_class=int(loaded.model.config.num_embeds_ada_norm),
                       checkpoint=checkpoint, progress=progress)  # fmt: skip
    trained = strip_qat(result.ema)
    info = {"base_model": loaded.source, "recipe": recipe.to_dict(), "config": asdict(cfg), "losses_per_100_steps": result.losses,
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    with staged_dir(Path(out_dir), protect=protect, force=force) as stage:
        trained.save_pretrained(stage)
        (stage / RECIPE_FILE).write_text(recipe.to_json() + "\n")
        (stage / PIPELINE_FILE).write_text(json.dumps(pipe, indent=2) + "\n")
        (stage / "qat.json").write_text(json.dumps(info, indent=2) + "\n")
        write_manifest(stage, {"kind": "qat"})
    return info
