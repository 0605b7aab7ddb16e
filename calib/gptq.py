"""GPTQ (Frantar et al., 2022) with each layer's own bit width and group size.

Pure functions on tensors:

- :func:`accumulate_hessian` folds calibration inputs ``X`` of a linear into ``H = 2/n * X^T X``;
- :func:`gptq_quantize` quantizes a ``[N, K]`` weight column by column in input-channel order, pushing each
  column's rounding error onto the columns not yet quantized through the inverse Hessian's Cholesky
  factor, so that ``|X W^T - X Q^T|`` rather than ``|W - Q|`` is minimised.

Groups follow :mod:`ditq.calib.numerics`: ``group_size`` consecutive input channels per scale and zero
point, chosen by min-max on the *error-updated* weights of the group when the algorithm reaches its first
column (as in the GPTQ reference code). Blocks of lazily applied updates are a multiple of the group
size, so a group never straddles two blocks. The result is a :class:`QuantizedTensor`, the same type RTN
gives, so export and validation do not care which method made the codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditq.calib.numerics import QuantizedTensor, choose_qparams, qrange


@dataclass
class HessianState:
    """A running ``H = 2/n sum x x^T`` over ``n`` input rows (float64)."""

    h: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, k: int) -> "HessianState":
        return cls(torch.zeros(k, k, dtype=torch.float64))


def accumulate_hessian(state: HessianState, x: torch.Tensor) -> HessianState:
    """Fold inputs ``x [..., K]`` (every token is one row) into ``state`` in place and return it."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    m = x.shape[0]
    if m == 0:
        return state
    state.h.mul_(state.n / (state.n + m))
    state.n += m
    x = x * (2.0 / state.n) ** 0.5
    state.h.addmm_(x.T, x)
    return state


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedTensor
    loss: float  # sum over rows of the GPTQ objective: sum_i (w_i - q_i)^2 / [H^-1]_ii / 2


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = False,
    *,
    percdamp: float = 0.01,
    blocksize: int = 128,
) -> GPTQResult:
    """GPTQ codes of weight ``w [N, K]`` under Hessian ``h [K, K]``."""
    w = w.detach().to(torch.float64).clone()
    n, k = w.shape
    g = group_size or k
    if k % g:
        raise ValueError(f"group size {g} does not divide the input width {k}")
    if h.shape != (k, k):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} does not fit a weight with {k} input channels")
    h = h.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0  # channels never active in calibration: their weight cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    lo, hi = qrange(bits, symmetric)
    codes = torch.zeros(n, k, dtype=torch.int16)
    scales = torch.zeros(n, k // g, dtype=torch.float32)
    zeros = torch.zeros(n, k // g, dtype=torch.float32)
    bs = max(g, (blocksize // g) * g) if g <= blocksize else g
    loss = torch.zeros(n, dtype=torch.float64)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # qparams of the group, from its current (error-updated) weights
                s, z = choose_qparams(w1[:, i : i + g].float(), bits, g, symmetric)
                scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
            s, z = scales[:, col // g].double(), zeros[:, col // g].double()
            x = w1[:, i]
            q = torch.clamp(torch.round(x.float() / s.float()).double() + z, lo, hi)
            dq = (q - z) * s
            d = hinv1[i, i]
            loss += (x - dq) ** 2 / d**2 / 2
            e = (x - dq) / d
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
            codes[:, col] = q.to(torch.int16)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    qt = QuantizedTensor(codes, scales, zeros.to(torch.int16), bits, g, symmetric)
    return GPTQResult(qt, float(loss.sum()))


def layer_output_error(w: torch.Tensor, q: QuantizedTensor, x: torch.Tensor) -> float:
    """Relative output error ``|x W^T - x Q^T| / |x W^T|`` of a quantized linear on inputs ``x``."""
    x = x.reshape(-1, x.shape[-1]).double()
    ref = x @ w.detach().double().T
    out = x @ q.dequantize().double().T
    return float(torch.linalg.norm(ref - out) / torch.linalg.norm(ref))
