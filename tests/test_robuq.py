"""RobuQ numerics: the block Hadamard rotation is an exact identity in float, and the dynamic-programming
bit allocation meets the average budget exactly and is optimal (checked by brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ditq.adapters import adapter_for
from ditq.calib.hadamard import hadamard, rotate
from ditq.calib.robuq import allocate_bits
from ditq.recipe import rotation_block


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_symmetric_and_orthonormal(n):
    """Sylvester's construction (scipy's ``hadamard``, the order RobuQ's rotation and the exported graph
    use), normalised: exactly +-1/sqrt(n). Symmetry and orthonormality alone would let the identity pass."""
    from scipy.linalg import hadamard as scipy_hadamard

    h = hadamard(n, torch.float64)
    np.testing.assert_array_equal(h.numpy(), scipy_hadamard(n).astype(np.float64) / np.sqrt(n))
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        hadamard(12)


def test_rotation_blocks():
    assert [rotation_block(k) for k in (1152, 4608, 192, 768, 96)] == [128, 128, 64, 128, 32]


@pytest.mark.parametrize("k", [192, 1152])
def test_rotation_is_an_identity_for_a_linear(k):
    """(x H)(W H)^T = x W^T with a block Hadamard H: the rotated layer is the same function in float."""
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(5, 7, k, generator=g, dtype=torch.float64), torch.randn(48, k, generator=g, dtype=torch.float64)
    b = rotation_block(k)
    torch.testing.assert_close(rotate(x, b) @ rotate(w, b).T, x @ w.T, rtol=0, atol=1e-10)
    assert not torch.allclose(rotate(x, b), x)  # and it really changes the activations
    # it spreads an outlier channel: the largest magnitude per token shrinks
    spike = torch.zeros(1, k, dtype=torch.float64)
    spike[0, 3] = 100.0
    assert rotate(spike, b).abs().max() == pytest.approx(100.0 / np.sqrt(b))


def _brute_force(cost, budget):
    names = list(cost)
    best = None
    for picks in itertools.product(*(sorted(cost[n]) for n in names)):
        if sum(picks) != budget * len(names):
            continue
        c = sum(cost[n][b] for n, b in zip(names, picks))
        if best is None or c < best[0]:
            best = (c, dict(zip(names, picks)))
    return best


def test_allocation_meets_the_budget_exactly_and_beats_uniform():
    rng = np.random.default_rng(0)
    cost = {}
    for i in range(7):  # error falls with bits; a few layers are far more sensitive at low bits
        base = rng.uniform(0.1, 1.0) * (20.0 if i in (1, 4) else 1.0)
        cost[f"l{i}"] = {2: base, 3: base / 4, 4: base / 16}
    alloc = allocate_bits(cost, 3.0)
    assert sum(alloc.values()) == 3 * len(cost)  # exactly the average budget
    got = sum(cost[n][b] for n, b in alloc.items())
    want, _ = _brute_force(cost, 3)
    assert got == pytest.approx(want, rel=1e-12)  # optimal
    assert got < sum(float(c[3]) for c in cost.values())  # and strictly better than every layer at 3 bits
    assert alloc["l1"] == 4 and alloc["l4"] == 4  # the sensitive layers get the bits


def test_allocation_with_weights_and_infeasible_budgets():
    cost = {"qkv": {2: 5.0, 4: 1.0}, "out": {2: 1.0, 4: 0.5}, "fc1": {2: 2.0, 4: 0.1}}
    alloc = allocate_bits(cost, 2.8, weights={"qkv": 3})  # qkv stands for 3 layers: 5 layers, 14 bits
    assert 3 * alloc["qkv"] + alloc["out"] + alloc["fc1"] == 14
    assert alloc == {"qkv": 2, "out": 4, "fc1": 4}  # the only way to 14 bits
    with pytest.raises(ValueError, match="whole number"):
        allocate_bits(cost, 2.5)
    with pytest.raises(ValueError, match="exactly"):
        allocate_bits({"a": {2: 1.0, 4: 0.0}}, 3.0)


# ------------------------------------------------------------------------------ graphs, export, QAT
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import ditq  # noqa: E402
from ditq.calib.numerics import quantize_ternary  # noqa: E402
from ditq.graphs.rotate import InsertRotationPass, RotationTarget  # noqa: E402
from ditq.graphs.tensors import code_tensor  # noqa: E402
from ditq.recipe import Recipe  # noqa: E402
from ditq.runtime.session import create_session  # noqa: E402

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


def test_ternary_codes_and_int2_packing_decoded_by_onnx_runtime():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    qt = quantize_ternary(w, 64)
    codes = qt.codes.numpy()
    assert set(np.unique(codes)) == {-1, 0, 1} and qt.bits == 2 and qt.symmetric
    torch.testing.assert_close(qt.scale[:, 0], w.abs().mean(1))  # absmean per output channel
    t = code_tensor("W", codes.T, 2, True)  # [K, N], four codes per byte
    assert t.data_type == TensorProto.INT2 and len(t.raw_data) == codes.size // 4
    dq = helper.make_node("DequantizeLinear", ["W", "S"], ["y"], axis=0, block_size=64)
    graph = helper.make_graph([dq], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 24])],
                              [t, numpy_helper.from_array(qt.scale.numpy().T.copy(), "S")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)], ir_version=13)
    got = create_session(model.SerializeToString()).run(None, {})[0]
    np.testing.assert_array_equal(got, (codes * qt.scale.numpy()).T.astype(np.float32))


def test_rotation_pass_keeps_a_float_linear_unchanged():
    """MatMul(x, (W H)^T) after the in-graph rotation x -> x H equals x W^T (float, fp32 rounding only)."""
    k, n, b = 96, 10, 32
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(n, k, generator=g), torch.randn(2, 5, k, generator=g)
    mm = helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")
    graph = helper.make_graph([mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, n])],
                              [numpy_helper.from_array(rotate(w, b).T.contiguous().numpy(), "Wt")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    res = InsertRotationPass([RotationTarget("mm", "layer", b, k)])(model)
    ops = [nd.op_type for nd in model.graph.node]
    assert res.count == 1 and ops == ["DequantizeLinear", "Shape", "Reshape", "MatMul", "Reshape", "MatMul"]
    y = create_session(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, (x @ w.T).numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("target", ["qdq", "ort"])
def test_robuq_export_validates(tmp_path, tiny_dit, target):
    src = tmp_path / "src"
    tiny_dit.save_pretrained(src)
    loaded = ditq.load_model(str(src))
    recipe = Recipe.robuq(DIT, 3, rotate=True, act_bits={"transformer_blocks.1.ff.net.2": 2})
    qdit = ditq.quantize(loaded.model, recipe, target=target)
    ditq.export(qdit, tmp_path / "m", source=loaded.source)
    proto = onnx.load(str(tmp_path / "m" / "model.onnx"))
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    # INT2 tensors (qdq) need opset 25 / IR 13; the ort target packs ternary codes into MatMulNBits' uint8
    assert (proto.ir_version, opset) == ((13, 25) if target == "qdq" else (10, 21))
    ops = [nd.op_type for nd in proto.graph.node]
    depth = tiny_dit.config.num_layers
    # one rotation per distinct input: q/k/v share, plus out, fc1, fc2 and adaLN of every block
    assert sum(1 for nd in proto.graph.node if nd.op_type == "MatMul" and nd.name.endswith("/rotate/hadamard")) == 5 * depth
    if target == "qdq":
        int2 = [t for t in proto.graph.initializer if t.data_type == TensorProto.INT2]
        assert len(int2) == 9 * depth  # ternary: 6 block linears, adaLN and the 2 timestep-MLP linears per block
        assert sum(p.quant.ternary for p in qdit.plans.values()) == 9 * depth
    else:
        bits = [next(a.i for a in nd.attribute if a.name == "bits") for nd in proto.graph.node if nd.op_type == "MatMulNBits"]
        assert bits.count(2) == 9 * depth and "MatMulIntegerToFloat" not in ops
    report = ditq.validate(tmp_path / "m")
    assert report.passed, report.table()


@pytest.mark.slow  # exports the digits DiT twice: about 25 s; the tiny RobuQ exports stay in the fast lane
def test_robuq_file_is_small(tmp_path):
    """The shipped digits model at W1.58 (RobuQ coverage) is at most 0.09x its float export."""
    loaded = ditq.load_model("digits")
    sizes = {}
    for name, recipe in (("float", Recipe(ditq.LayerQuant(None, None, None), ())), ("w158", Recipe.robuq(DIT, 4))):
        sizes[name] = ditq.export(ditq.quantize(loaded.model, recipe), tmp_path / name, source=loaded.source).file_bytes
    assert sizes["w158"] <= 0.09 * sizes["float"], sizes


def diffusion_loss(model, x0, labels, t, noise):
    """DDPM's epsilon loss on the linear schedule (betas 1e-4..0.02 over 1000 steps), written out here."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()[t].view(-1, 1, 1, 1)
    out = model(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, timestep=t, class_labels=labels, return_dict=False)[0]
    return torch.mean((out[:, : x0.shape[1]] - noise) ** 2)


def test_qat_loss_decreases_and_weights_save_as_a_plain_dit(tmp_path, tiny_dit):
    from ditq.calib.qat import prepare_qat, strip_qat
    from ditq.calib.qlinear import QATLinear

    model = prepare_qat(tiny_dit, Recipe.robuq(DIT, 2))
    assert sum(isinstance(m, QATLinear) for m in model.modules()) > 0
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(32, 4, 8, 8, generator=g).clamp(-1, 1)
    y, t, noise = torch.randint(0, 10, (32,), generator=g), torch.randint(0, 1000, (32,), generator=g), torch.randn(32, 4, 8, 8, generator=g)
    with torch.no_grad():
        before = float(diffusion_loss(model, x0, y, t, noise))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(30):
        opt.zero_grad()
        diffusion_loss(model, x0, y, t, noise).backward()
        opt.step()
    with torch.no_grad():
        after = float(diffusion_loss(model, x0, y, t, noise))
    assert after < 0.8 * before, (before, after)
    grads = [p.grad for m in model.modules() if isinstance(m, QATLinear) for p in (m.weight,)]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)  # gradients reach every ternary weight
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the float (latent) weights
    with torch.no_grad():
        quantized_out = model(x0, timestep=t, class_labels=y).sample
    plain = strip_qat(model)
    assert not any(isinstance(m, QATLinear) for m in plain.modules())
    plain.save_pretrained(tmp_path / "qat")
    # diffusers' own loader reads it back as a plain DiT holding exactly the trained float weights, and it
    # computes the float forward (the quantized one is what QAT trained through, not what is saved)
    from diffusers import DiTTransformer2DModel

    reloaded = DiTTransformer2DModel.from_pretrained(tmp_path / "qat").eval()
    got = reloaded.state_dict()
    assert sorted(got) == sorted(trained)
    assert all(torch.equal(got[k], trained[k]) for k in trained)
    with torch.no_grad():
        float_out = reloaded(x0, timestep=t, class_labels=y).sample
        torch.testing.assert_close(float_out, plain(x0, timestep=t, class_labels=y).sample, rtol=0, atol=0)
    assert not torch.allclose(float_out, quantized_out, atol=1e-3)
