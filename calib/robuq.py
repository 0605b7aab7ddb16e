"""RobuQ's pieces: ternary weights, block Hadamard rotation, and activation-only mixed precision.

- **Ternary weights** (W1.58, BitNet b1.58): one scale per output channel, the mean absolute weight
  ``s = mean|w|``, and codes ``q = clamp(round(w / s), -1, 1)``; ``w ~ q * s``. Stored as 2-bit signed
  codes (ONNX INT2 at opset 25; the symmetric 2-bit grid of :mod:`ditq.calib.numerics` is exactly {-1, 0, 1}).
- **Hadamard rotation**: ``y = x W^T = (x H)(W H)^T`` for an orthonormal ``H`` (``H H^T = I``). ``H`` is
  block diagonal with Sylvester Hadamard blocks of size ``b``, the largest power of two dividing the
  width ``K`` (at most :data:`MAX_ROTATION`), normalised by ``1/sqrt(b)``; the normalised Sylvester matrix
  is symmetric, so ``H^T = H``. Weights are rotated offline, activations online in the graph, before
  their per-token quantization: the rotation spreads outlier channels over the block, so each token's
  values are closer to Gaussian and a uniform 2-4 bit grid loses less.
- **Mixed activation bits**: per-layer sensitivities ``cost[layer][bits]`` (output error with only that
  layer's input at ``bits``) and an average-bit budget; :func:`allocate_bits` chooses one width per
  layer by dynamic programming so that the bits sum to exactly ``budget x layers`` at the least total cost.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

MAX_ROTATION = 256  # largest Hadamard block (1152 -> 128, 4608 -> 512 capped to 256, 192 -> 64)


def rotation_block(width: int) -> int:
    """The Hadamard block size for a width: its largest power-of-two divisor, at most :data:`MAX_ROTATION`."""
    return min(width & -width, MAX_ROTATION)


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


def ternary_qparams(w: torch.Tensor) -> torch.Tensor:
    """Per-row absmean scale of a ``[N, K]`` weight (floored so an all-zero row stays finite)."""
    return torch.clamp(w.abs().mean(dim=1, keepdim=True), min=1e-8)


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
