"""Quantization numerics: choose qparams, quantize, dequantize, fake-quantize, weight codes (round to
nearest, ternary), pack.

Every tensor is grouped along its **last** axis (the input-channel axis of a linear's ``[N, K]`` weight,
the channel axis of a ``[..., K]`` activation) in groups of ``group_size`` consecutive elements; one scale
and zero point per group:

| granularity            | group_size | block shape of one (scale, zero point) |
|------------------------|------------|----------------------------------------|
| per group (Q-DiT)      | g          | weight: 1 x g;  activation: 1 token x g |
| per channel / per token| K          | weight: 1 x K;  activation: 1 token x K |

Asymmetric (default, Q-DiT's min-max formula; the range is widened to include 0 so that 0 is exact and
the zero point is a valid code)::

    lo = min(min(x), 0),  hi = max(max(x), 0)
    s  = max((hi - lo) / (2^b - 1), EPS)
    z  = round(-lo / s)                       in [0, 2^b - 1]
    q  = clamp(round(x / s) + z, 0, 2^b - 1)  (unsigned codes)
    x' = (q - z) * s

Symmetric (zero point 0, signed codes, the most negative code unused so the grid is symmetric; at
b = 2 this is the ternary grid {-1, 0, +1})::

    s  = max(max|x| / (2^(b-1) - 1), EPS)
    q  = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1)

``round`` is half-to-even (``torch.round``), which is also ONNX QuantizeLinear's rounding, and every
operation is written in the order the exported graph computes it, so codes agree bit for bit with
ONNX Runtime on the same float input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-8  # floor on the scale: an all-zero group quantizes to code z with s = EPS instead of dividing by 0


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Inclusive integer code range for ``bits``-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width {bits} is outside 1..8")
    if symmetric:
        top = 2 ** (bits - 1) - 1
        if top < 1:
            raise ValueError("symmetric quantization needs at least 2 bits")
        return -top, top
    return 0, 2**bits - 1


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide the last dimension {k}")
    return x.reshape(*x.shape[:-1], k // group_size, group_size)


def choose_qparams(
    x: torch.Tensor, bits: int, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point per group: ``[..., K] -> ([..., K/g], [..., K/g])``.

    The zero point is returned as an integer-valued float tensor (0 when symmetric).
    """
    xg = _grouped(x.float(), group_size)
    lo, hi = qrange(bits, symmetric)
    if symmetric:
        amax = torch.maximum(xg.amin(-1).abs(), xg.amax(-1).abs())
        scale = torch.clamp(amax / float(hi), min=EPS)
        return scale, torch.zeros_like(scale)
    mn = torch.clamp(xg.amin(-1), max=0.0)
    mx = torch.clamp(xg.amax(-1), min=0.0)
    scale = torch.clamp((mx - mn) / float(hi), min=EPS)
    zero = torch.round(-mn / scale)
    return scale, zero


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool = False
) -> torch.Tensor:
    """Integer codes (as an integer-valued float tensor) for ``x [..., K]`` with per-group qparams."""
    g = x.shape[-1] // scale.shape[-1]
    xg = _grouped(x.float(), g)
    lo, hi = qrange(bits, symmetric)
    # one temporary the size of x, rounded, shifted and clamped in place (the same operations in the same
    # order as clamp(round(x / s) + z)): the largest layers' quantization sets the export's peak memory
    q = xg / scale.unsqueeze(-1)
    q.round_().add_(zero.unsqueeze(-1)).clamp_(lo, hi)
    return q.reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` per group, float32."""
    g = q.shape[-1] // scale.shape[-1]
    qg = _grouped(q.float(), g)
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize(x: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> torch.Tensor:
    """Dynamic quantize-dequantize: qparams from this very tensor (every sample, every call)."""
    scale, zero = choose_qparams(x, bits, group_size, symmetric)
    return dequantize(quantize(x, scale, zero, bits, symmetric), scale, zero).to(x.dtype)


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes of a ``[rows, K]`` tensor with one (scale, zero point) per row and group of ``K``.

    ``codes``: int16 ``[rows, K]``; ``scale``: float32 ``[rows, K/g]``; ``zero``: int16 ``[rows, K/g]``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero.float())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


RTN_CHUNK_ELEMENTS = 1 << 22  # quantize_rtn's rows per step: 16 MB of float32 temporaries whatever the layer


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedTensor:
    """Round-to-nearest min-max quantization of a ``[rows, K]`` weight, grouped along ``K``."""
    w = w.detach().float()
    scale, zero = choose_qparams(w, bits, group_size, symmetric)
    codes = torch.empty(w.shape, dtype=torch.int16)
    step = max(1, RTN_CHUNK_ELEMENTS // max(w.shape[-1], 1))  # rows at a time: one float temporary of a chunk
    for r in range(0, w.shape[0], step):
        codes[r : r + step] = quantize(w[r : r + step], scale[r : r + step], zero[r : r + step], bits, symmetric).to(torch.int16)
    return QuantizedTensor(codes, scale, zero.to(torch.int16), bits, group_size, symmetric)


def quantize_ternary(w: torch.Tensor, group_size: int) -> QuantizedTensor:
    """Ternary codes of a ``[N, K]`` weight (W1.58, BitNet b1.58): per row and group of ``group_size``,
    ``s = mean|w|``, ``q = clamp(round(w / s), -1, 1)`` (2-bit symmetric codes, zero point 0: the
    symmetric 2-bit grid above is exactly {-1, 0, 1}), ``w ~ q * s``."""
    w = w.detach().float()
    wg = _grouped(w, group_size)
    scale = torch.clamp(wg.abs().mean(-1), min=EPS)
    codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -1, 1).reshape(w.shape)
    return QuantizedTensor(codes.to(torch.int16), scale, torch.zeros_like(scale, dtype=torch.int16), 2, group_size, True)


def sqnr_db(reference: torch.Tensor | np.ndarray, test: torch.Tensor | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - test|^2)`` in dB (inf if equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    noise = float(np.sum(err * err))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(float(np.sum(ref * ref)) / noise))


# ---------------------------------------------------------------------------------------------- packing
def pack_4bit_u8(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes (any int dtype, values in [-8, 15]) two per byte, flattened in C order.

    Byte layout (ONNX INT4/UINT4 ``raw_data``): element ``2i`` in the low nibble (bits 0-3) of byte ``i``,
    element ``2i + 1`` in the high nibble (bits 4-7); an odd count leaves the last high nibble 0.
    Negative (int4) values are stored in two's complement.
    """
    flat = (np.asarray(codes).reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_4bit_u8(packed: np.ndarray, count: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_4bit_u8`: ``count`` codes as int8 (signed) or uint8."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2] = packed & 0xF
    out[1::2] = packed >> 4
    out = out[:count]
    if signed:
        return ((out.astype(np.int16) ^ 0x8) - 0x8).astype(np.int8)
    return out


def pack_2bit_u8(codes: np.ndarray) -> np.ndarray:
    """Pack 2-bit codes four per byte (ONNX INT2/UINT2): element ``4i + j`` in bits ``2j..2j+1`` of byte ``i``."""
    flat = (np.asarray(codes).reshape(-1).astype(np.int16) & 0x3).astype(np.uint8)
    pad = (-flat.size) % 4
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    return (flat[0::4] | (flat[1::4] << 2) | (flat[2::4] << 4) | (flat[3::4] << 6)).astype(np.uint8)


def unpack_2bit_u8(packed: np.ndarray, count: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_2bit_u8`."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.stack([(packed >> s) & 0x3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:count]
    if signed:
        return ((out.astype(np.int16) ^ 0x2) - 0x2).astype(np.int8)
    return out.astype(np.uint8)
