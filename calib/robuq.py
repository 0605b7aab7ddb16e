"""RobuQ's pieces: ternary weights, block Hadamard rotation, and activation-only mixed precision.

- **Ternary weights** (W1.58, BitNet b1.58): one scale per output channel, the mean absolute weight
  ``s = mean|w|``, and codes ``q = clamp(round(w / s), -1, 1)``; ``w ~ q * s``. Stored as 2-bit signed
  codes (ONNX INT2 at opset 25; the symmetric 2-bit grid of :mod:`ditq.calib.numerics` is exactly {-1, 0, 1}).
- **Hadamard rotation**: ``y = x W^T = (x H)(W H)^T`` for an orthonormal ``H`` (``H H^T = I``). ``H`` is
  block diagonal with Sylvester Hadamard blocks of size ``b``, the largest power of two dividing the
  width ``K`` (at most :data:`~ditq.recipe.MAX_ROTATION`), normalised by ``1/sqrt(b)``; the normalised Sylvester matrix
  is symmetric, so ``H^T = H``. Weights are rotated offline, activations online in the graph, before
  their per-token quantization: the rotation spreads outlier channels over the block, so each token's
  values are closer to Gaussian and a uniform 2-4 bit grid loses less.
- **Mixed activation bits**: per-layer sensitivities ``cost[layer][bits]`` (output error with only that
  layer's input at ``bits``, measured on the model's own inputs along its float sampling trajectories)
  and an average-bit budget; :func:`allocate_bits` chooses one width per layer by dynamic programming so
  that the bits sum to exactly ``budget x layers`` at the least total cost. :func:`mixed_recipe` is the
  whole path, model to recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ditq.calib.calibration import CalibConfig, record_model_inputs
from ditq.calib.numerics import EPS, QuantizedTensor, _grouped
from ditq.recipe import Recipe, rotation_block
from ditq.schedule import SchedulerSpec


def hadamard(n: int, dtype=torch.float32) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size ``n`` (a power of two): symmetric, orthonormal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x H`` along the last axis, ``H`` block diagonal with normalised Hadamard blocks of ``block``."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"rotation block {block} does not divide the width {k}")
    h = hadamard(block, x.dtype).to(x.device)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


_rotate = rotate  # for functions whose ``rotate`` argument is a flag


def quantize_ternary(w: torch.Tensor, group_size: int) -> QuantizedTensor:
    """Ternary codes of a ``[N, K]`` weight: per row and group of ``group_size``, ``s = mean|w|``,
    ``q = clamp(round(w / s), -1, 1)`` (2-bit symmetric codes, zero point 0)."""
    w = w.detach().float()
    wg = _grouped(w, group_size)
    scale = torch.clamp(wg.abs().mean(-1), min=EPS)
    codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -1, 1).reshape(w.shape)
    return QuantizedTensor(codes.to(torch.int16), scale, torch.zeros_like(scale, dtype=torch.int16), 2, group_size, True)


def allocate_bits(
    cost: Mapping[str, Mapping[int, float]], budget: float, weights: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Bits per layer minimising ``sum cost[layer][bits]`` subject to ``sum w_l * bits_l == budget * sum w_l``.

    ``weights`` (default 1 each) count how many layers a unit stands for (q/k/v share one quantizer, so
    that unit weighs 3). Raises ``ValueError`` when no assignment meets the budget exactly.
    """
    names = list(cost)
    w = {n: int((weights or {}).get(n, 1)) for n in names}
    target = budget * sum(w.values())
    if abs(target - round(target)) > 1e-9:
        raise ValueError(f"average {budget} bits over {sum(w.values())} layers is not a whole number of bits")
    target = int(round(target))
    # best[total] = (cost, choices) over the layers seen so far
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for n in names:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for total, (c, picks) in best.items():
            for b, cb in cost[n].items():
                t = total + w[n] * int(b)
                if t > target:
                    continue
                cand = (c + float(cb), picks + (int(b),))
                if t not in nxt or cand[0] < nxt[t][0]:
                    nxt[t] = cand
        best = nxt
    if target not in best:
        raise ValueError(f"no choice of bits per layer averages exactly {budget}")
    return dict(zip(names, best[target][1]))


def uniform_cost(cost: Mapping[str, Mapping[int, float]], bits: int) -> float:
    return sum(float(c[bits]) for c in cost.values())


def sensitivity_table(layers: Sequence[str], options: Sequence[int], measure) -> dict[str, dict[int, float]]:
    """``measure(layer, bits) -> error`` for every layer and bit width."""
    return {n: {b: float(measure(n, b)) for b in options} for n in layers}


# ------------------------------------------------------------------------- sensitivity of a real model
def block_units(model) -> dict[str, tuple[str, ...]]:
    """The activation quantizers of RobuQ's block linears, by unit: q/k/v share one input (one unit of
    three layers), then the attention output, fc1 and fc2 of every block."""
    import torch.nn as nn

    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units: dict[str, tuple[str, ...]] = {}
    i = 0
    while f"transformer_blocks.{i}.attn1.to_q" in names:
        p = f"transformer_blocks.{i}."
        units[p + "attn1.qkv"] = tuple(p + f"attn1.to_{c}" for c in "qkv")
        units[p + "attn1.to_out.0"] = (p + "attn1.to_out.0",)
        units[p + "ff.net.0.proj"] = (p + "ff.net.0.proj",)
        units[p + "ff.net.2"] = (p + "ff.net.2",)
        i += 1
    return units


# the trajectories sensitivity inputs are drawn from: 8 samples x 8 timesteps (x 2 rows with guidance)
SENSITIVITY_TRAJECTORIES = CalibConfig(num_samples=8, timesteps_per_sample=8, seed=0)


def sensitivity_inputs(model, *, clip_denoised: bool, schedule: SchedulerSpec | None = None, n: int = 64,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``n`` of the model's own inputs ``(x_t, t, labels)`` along its float DDIM trajectories
    (:data:`SENSITIVITY_TRAJECTORIES`, :func:`ditq.calib.calibration.record_model_inputs`), drawn without
    replacement with ``seed``: whatever the model's channels, size and classes, the inputs it sees when
    sampling. ``clip_denoised``: the model's sampling clamps ``x_0`` (pixel-space models); ``schedule``: how
    it samples (its ``LoadedModel.schedule``; None: DiT's)."""
    x, t, y = record_model_inputs(model, SENSITIVITY_TRAJECTORIES, schedule=schedule, clip_denoised=clip_denoised, progress=False)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], t[idx], y[idx]


def activation_sensitivity(model, options, *, rotate: bool, inputs, progress: bool = False) -> dict[str, dict[int, float]]:
    """Relative output error ``|f_u,b(x) - f(x)|^2 / |f(x)|^2`` with only unit ``u``'s input activation
    quantized to ``b`` bits (per token, after the rotation when ``rotate``; weights float: activation-only
    sensitivity). A rotated layer computes ``Q(x H)(W H)^T = (Q(x H) H) W^T``, so a forward pre-hook that
    replaces ``x`` with ``rotate(Q(rotate(x)))`` measures it on the float weights."""
    from tqdm.auto import tqdm

    from ditq.calib.numerics import fake_quantize

    named = dict(model.named_modules())
    x, t, y = inputs
    with torch.no_grad():
        ref = model(x, timestep=t, class_labels=y).sample
        norm = float((ref.double() ** 2).sum())
        out: dict[str, dict[int, float]] = {}
        units = block_units(model)
        for unit, members in tqdm(list(units.items()), desc="activation sensitivity", unit="unit", disable=not progress):
            out[unit] = {}
            for bits in options:
                def hook(_mod, args, bits=bits):
                    a = args[0]
                    k = a.shape[-1]
                    b = rotation_block(k) if rotate else None
                    a = _rotate(a, b) if b else a
                    a = fake_quantize(a, bits, k)
                    return (_rotate(a, b) if b else a,)  # H H = I: back to the float weights' basis

                handles = [named[m].register_forward_pre_hook(hook) for m in members]
                try:
                    o = model(x, timestep=t, class_labels=y).sample
                finally:
                    for h in handles:
                        h.remove()
                out[unit][bits] = float(((o - ref).double() ** 2).sum()) / norm
    return out


def mixed_activation_bits(
    model, avg_bits: int, *, rotate: bool, inputs, options: Sequence[int] | None = None, progress: bool = False
) -> tuple[dict[str, int], dict[str, dict[int, float]], dict[str, int]]:
    """RobuQ's AMPN: per-unit activation bits averaging exactly ``avg_bits`` over the block linears (q/k/v
    count three times), chosen by :func:`allocate_bits` on the measured sensitivities. Returns the bits
    per module, the sensitivity table and the bits per unit."""
    options = list(options or range(max(1, avg_bits - 1), min(8, avg_bits + 2) + 1))
    table = activation_sensitivity(model, options, rotate=rotate, inputs=inputs, progress=progress)
    units = block_units(model)
    per_unit = allocate_bits(table, float(avg_bits), weights={u: len(m) for u, m in units.items()})
    per_module = {m: per_unit[u] for u, members in units.items() for m in members}
    return per_module, table, per_unit


@dataclass(frozen=True)
class MixedRecipe:
    """RobuQ's recipe with activation bits per module, and how they were chosen."""

    recipe: Recipe
    bits_per_unit: dict[str, int]  # q/k/v as one unit (``...attn1.qkv``), out, fc1, fc2 of every block
    sensitivity: dict[str, dict[int, float]]  # unit -> bits -> relative output error


def mixed_recipe(model, avg_bits: int, *, rotate: bool = True, clip_denoised: bool = False,
                 schedule: SchedulerSpec | None = None, progress: bool = False) -> MixedRecipe:  # fmt: skip
    """``Recipe.robuq(avg_bits, rotate)`` with mixed activation bits for ``model``: sensitivities measured
    on the model's own sampling inputs (:func:`sensitivity_inputs`), bits allocated by
    :func:`mixed_activation_bits` to average exactly ``avg_bits`` over the block linears."""
    inputs = sensitivity_inputs(model, clip_denoised=clip_denoised, schedule=schedule)
    per_module, table, per_unit = mixed_activation_bits(model, avg_bits, rotate=rotate, inputs=inputs, progress=progress)
    return MixedRecipe(Recipe.robuq(avg_bits, rotate=rotate, act_bits=per_module), per_unit, table)
