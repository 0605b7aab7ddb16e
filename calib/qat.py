"""Quantization-aware training (RobuQ): fine-tune a DiT through its quantizers with straight-through
estimators, from the float weights.

Every linear the recipe covers becomes a :class:`~ditq.calib.qlinear.QATLinear` for the duration of
training. Its forward is the layer as exported, bit for bit (Hadamard rotation of input and weight when
the recipe rotates, the recipe's dynamic activation quantizer, ternary or RTN weights), and its backward
passes gradients straight through both quantizers to the float weights, which stay the trained
parameters. A ``QATLinear`` is an ``nn.Linear`` with the same parameters, so the trained model
saves as a plain diffusers DiT; ``ditq export --recipe`` then quantizes it exactly as at training time.
The loop is :func:`ditq.calib.train.train_dit` (seeded, resumable, progress bar, EMA); the ``ditq qat``
workflow that runs it and writes the folder is :mod:`ditq.workflows.qat`.
"""

from __future__ import annotations

import torch.nn as nn

from ditq.calib.qlinear import QATLinear, swap_module
from ditq.recipe import Recipe


def prepare_qat(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Swap every covered linear of ``model`` (in place) for a :class:`~ditq.calib.qlinear.QATLinear`;
    returns the model."""
    for name, plan in recipe.resolve(model).items():
        if plan.kind == "linear":
            swap_module(model, name, QATLinear(model.get_submodule(name), plan))
    return model


def strip_qat(model: nn.Module) -> nn.Module:
    """Swap every ``QATLinear`` back to a plain ``nn.Linear`` with the same parameters (in place)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QATLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight, lin.bias = mod.weight, mod.bias
            swap_module(model, name, lin)
    return model



