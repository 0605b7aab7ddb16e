"""calib.numerics: qparams, rounding, saturation, round-trip bounds and packing decoded by ONNX Runtime."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ditq.calib.numerics import (
    choose_qparams,
    dequantize,
    fake_quantize,
    pack_2bit_u8,
    pack_4bit_u8,
    quantize,
    quantize_rtn,
    qrange,
    sqnr_db,
    unpack_2bit_u8,
    unpack_4bit_u8,
)
from ditq.graphs.tensors import code_tensor
from tests.conftest import make_model, run_ort


def reference_quantize(x: np.ndarray, bits: int, group: int, symmetric: bool = False):
    """The README's formulas, written here in numpy float32 (IEEE operations, so the same bits as any
    correct float32 implementation): ``(scale, zero, codes, dequantized)``, grouped along the last axis."""
    xg = x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // group, group)
    if symmetric:
        top = np.float32(2 ** (bits - 1) - 1)
        s = np.maximum(np.abs(xg).max(-1) / top, np.float32(1e-8))
        z = np.zeros_like(s)
        q = np.clip(np.round(xg / s[..., None]), -top, top)
    else:
        top = np.float32(2**bits - 1)
        lo, hi = np.minimum(xg.min(-1), np.float32(0)), np.maximum(xg.max(-1), np.float32(0))
        s = np.maximum((hi - lo) / top, np.float32(1e-8))
        z = np.round(-lo / s)
        q = np.clip(np.round(xg / s[..., None]) + z[..., None], np.float32(0), top)
    return s, z, q.reshape(x.shape), ((q - z[..., None]) * s[..., None]).reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric):
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(bits)) * 3
    s, z = choose_qparams(x, bits, 32, symmetric)
    q = quantize(x, s, z, bits, symmetric)
    # the qparams and codes are the README's, exactly
    s_ref, z_ref, q_ref, x_ref = reference_quantize(x.numpy(), bits, 32, symmetric)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(z.numpy(), z_ref)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(dequantize(q, s, z).numpy(), x_ref)
    lo, hi = qrange(bits, symmetric)
    assert q.min() >= lo and q.max() <= hi and torch.equal(q, torch.round(q))
    err = (dequantize(q, s, z) - x).abs().reshape(16, 3, 32)
    # min-max qparams cover every value, so rounding is the only error: half a step (+ fp32 slack)
    assert torch.all(err <= torch.from_numpy(s_ref).unsqueeze(-1) * (0.5 + 1e-5))


def test_asymmetric_range_includes_zero_and_zero_is_exact():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # all positive: the range is widened to [0, 4]
    s, z = choose_qparams(x, 4, 4)
    assert z.item() == 0 and s.item() == pytest.approx(4 / 15)
    y = torch.tensor([[0.0, -1.0, 2.0, 0.0]])
    s, z = choose_qparams(y, 8, 4)
    assert dequantize(quantize(y, s, z, 8), s, z)[0, 0].item() == 0.0


def test_saturation_clamps_to_the_code_range():
    x = torch.tensor([[-100.0, -1.0, 0.0, 1.0, 100.0, 7.0, 8.0, 9.0]])
    s = torch.ones(1, 1)
    z = torch.full((1, 1), 8.0)
    q = quantize(x, s, z, 4)  # codes = x + 8 clamped to [0, 15]
    assert q.tolist() == [[0, 7, 8, 9, 15, 15, 15, 15]]
    q = quantize(x, s, torch.zeros(1, 1), 3, symmetric=True)  # [-3, 3]
    assert q.tolist() == [[-3, -1, 0, 1, 3, 3, 3, 3]]


def test_ties_round_half_to_even():
    s = torch.ones(1, 1)
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 4.5]])
    q = quantize(x, s, torch.zeros(1, 1), 8, symmetric=True)
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 4, 4]]


def test_symmetric_two_bits_is_ternary():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    qt = quantize_rtn(w, 2, 64, symmetric=True)
    assert set(qt.codes.unique().tolist()) == {-1, 0, 1}
    assert torch.all(qt.zero == 0)
    s_ref, _, q_ref, _ = reference_quantize(w.numpy(), 2, 64, symmetric=True)  # s = max|w|, q = round(w / s)
    np.testing.assert_array_equal(qt.scale.numpy(), s_ref)
    np.testing.assert_array_equal(qt.codes.numpy(), q_ref)


@pytest.mark.parametrize("bits,group,symmetric", [(8, 16, False), (4, 64, False), (3, 32, True), (8, 16, True)])
def test_fake_quantize_is_the_readme_formula_per_token_and_group(bits, group, symmetric):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(bits + group)) * 2
    x[0, 1, 7] = 40.0  # an outlier: it widens only its own token's group
    np.testing.assert_array_equal(fake_quantize(x, bits, group, symmetric).numpy(), reference_quantize(x.numpy(), bits, group, symmetric)[3])


def test_fake_quantize_is_per_token_and_dynamic():
    x = torch.randn(2, 5, 64)
    y = fake_quantize(x, 8, 16)
    # scaling one token changes only that token's qparams: the others are untouched
    x2 = x.clone()
    x2[0, 0] *= 100
    y2 = fake_quantize(x2, 8, 16)
    assert torch.equal(y[1], y2[1]) and torch.equal(y[0, 1:], y2[0, 1:])
    assert sqnr_db(x, y) > 40  # 8-bit, groups of 16: ~48 dB for Gaussian data


def test_all_zero_group_does_not_divide_by_zero():
    x = torch.zeros(1, 32)
    assert torch.equal(fake_quantize(x, 4, 16), x)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 64, 129])
@pytest.mark.parametrize("pack,unpack,bits", [(pack_4bit_u8, unpack_4bit_u8, 4), (pack_2bit_u8, unpack_2bit_u8, 2)])
def test_pack_round_trip_odd_counts(n, pack, unpack, bits):
    rng = np.random.default_rng(n)
    u = rng.integers(0, 2**bits, n)
    s = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), n)
    assert pack(u).size == -(-n * bits // 8)
    assert np.array_equal(unpack(pack(u), n, signed=False), u)
    assert np.array_equal(unpack(pack(s), n, signed=True), s)


def test_pack_byte_order():
    assert pack_4bit_u8(np.array([1, 2])).tolist() == [0x21]  # element 0 in the low nibble
    assert pack_2bit_u8(np.array([1, 2, 3, 0])).tolist() == [0b00111001]  # element 0 in bits 0-1


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (3, False), (8, False), (8, True), (6, True)])
@pytest.mark.parametrize("shape", [(5, 3), (7, 33)])
def test_packed_codes_decoded_by_onnxruntime(bits, symmetric, shape):
    """ORT's DequantizeLinear reads our packed bytes back to exactly (q - z) * s."""
    rng = np.random.default_rng(0)
    lo, hi = qrange(bits, symmetric)
    q = rng.integers(lo, hi + 1, shape)
    scale = np.float32(0.25)
    z = 0 if symmetric else int(rng.integers(lo, hi + 1))
    inputs = ["q", "s"] + ([] if symmetric else ["z"])
    inits = [code_tensor("q", q, bits, symmetric), helper.make_tensor("s", TensorProto.FLOAT, [], [scale])]
    if not symmetric:
        inits.append(code_tensor("z", np.array(z), bits, symmetric))
    node = helper.make_node("DequantizeLinear", inputs, ["y"])
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = make_model(graph)
    onnx.checker.check_model(model, full_check=True)
    (y,) = run_ort(model, {})
    assert np.array_equal(y, ((q - z) * scale).astype(np.float32))


def test_sqnr():
    a = np.ones(100)
    assert sqnr_db(a, a) == float("inf")
    assert sqnr_db(a, a * 1.1) == pytest.approx(20.0)


def test_rtn_in_row_chunks_gives_the_codes_of_the_whole_weight(monkeypatch):
    """quantize_rtn quantizes a few rows at a time (peak memory); the codes are those of the formula
    clamp(round(w / s) + z) over the whole weight, computed here directly."""
    import ditq.calib.numerics as nm

    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0)) * 3
    whole = nm.quantize_rtn(w, 4, 16)
    monkeypatch.setattr(nm, "RTN_CHUNK_ELEMENTS", 5 * 64)  # 5 rows per step, a short last step
    chunked = nm.quantize_rtn(w, 4, 16)
    s, z = whole.scale.repeat_interleave(16, dim=1), whole.zero.float().repeat_interleave(16, dim=1)
    direct = torch.clamp(torch.round(w / s) + z, 0, 15).to(torch.int16)
    assert torch.equal(chunked.codes, direct) and torch.equal(whole.codes, direct)
    assert torch.equal(chunked.scale, whole.scale) and torch.equal(chunked.zero, whole.zero)
