"""``ditq eval --layer-error`` on Hadamard-rotated layers, against a float64 computation written here.

A rotated layer stores ``Q(W H)`` and computes ``Q_a(x H) Q(W H)^T``; its error is relative to the float
layer ``x W^T`` (no bias, as the report defines it). The reference below builds ``H`` (block-diagonal
normalised Sylvester blocks of the largest power of two dividing K, at most 128), the ternary codes
(per output row ``s = mean|w|``, ``q = clip(round(w / s), -1, 1)``) and the per-token asymmetric
min-max activation quantizer from their definitions, in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from ditq.adapters import adapter_for
from ditq.exporter.reference import quantize_model
from ditq.recipe import Recipe
from ditq.workflows.evaluate import _layer_error

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here

LAYERS = ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2")  # K = 64 and K = 256


def _hadamard_blocks(k: int) -> np.ndarray:
    b = min(k & -k, 128)
    h = np.ones((1, 1))
    while len(h) < b:
        h = np.block([[h, h], [h, -h]])
    return np.kron(np.eye(k // b), h / np.sqrt(b))


def _ternary(w: np.ndarray) -> np.ndarray:
    s = np.abs(w).mean(1, keepdims=True)
    return np.clip(np.round(w / s), -1, 1) * s


def _act_quant(x: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = np.minimum(x.min(1, keepdims=True), 0), np.maximum(x.max(1, keepdims=True), 0)
    s = (hi - lo) / (2**bits - 1)
    z = np.round(-lo / s)
    return (np.clip(np.round(x / s) + z, 0, 2**bits - 1) - z) * s


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def test_layer_error_of_rotated_ternary_layers_matches_an_independent_float64_computation(tiny_dit):
    abits = 4
    qdit = quantize_model(tiny_dit, Recipe.robuq(DIT, abits, rotate=True), progress=False)
    named = dict(tiny_dit.named_modules())
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name in LAYERS:
        k = named[name].in_features
        x = torch.randn(64, k, generator=g)
        x[:, torch.randperm(k, generator=g)[:3]] *= 20.0  # outlier channels: what the rotation spreads out
        inputs[name] = x
        assert qdit.plans[name].rotation  # the recipe rotates these layers

    right, wrong = [], []
    for name in LAYERS:
        x = inputs[name].double().numpy()
        w = named[name].weight.detach().double().numpy()
        h = _hadamard_blocks(w.shape[1])
        ref = x @ w.T
        wq = _ternary(w @ h)  # the stored weight: codes of W H
        right.append(_rel(_act_quant(x @ h, abits) @ wq.T, ref))
        wrong.append(_rel(_act_quant(x, abits) @ wq.T, ref))  # the unrotated input against W H
    expected, buggy = float(np.mean(right)), float(np.mean(wrong))

    got = _layer_error(qdit, inputs)
    # float32 (ditq) vs float64 (here): only float32 round-off differs (measured 9e-9), unless a value within
    # that round-off of a rounding boundary lands on the neighbouring code; none does on these inputs
    assert abs(got - expected) < 1e-6, (got, expected)
    assert expected < 0.5 * buggy, (expected, buggy)  # the two definitions are far apart here
    assert abs(got - buggy) > 0.1
