"""Block Hadamard rotation (RobuQ, QuaRot): ``y = x W^T = (x H)(W H)^T`` for an orthonormal ``H``.

``H`` is block diagonal with Sylvester Hadamard blocks of size ``b``, the largest power of two dividing
the width ``K`` (at most :data:`~ditq.recipe.MAX_ROTATION`, see :func:`~ditq.recipe.rotation_block`),
normalised by ``1/sqrt(b)``; the normalised Sylvester matrix is symmetric, so ``H^T = H`` and
``H H = I``. Weights are rotated offline, activations online in the graph, before their per-token
quantization: the rotation spreads outlier channels over the block, so each token's values are closer
to Gaussian and a uniform 2-4 bit grid loses less.
"""

from __future__ import annotations

import math

import torch


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
