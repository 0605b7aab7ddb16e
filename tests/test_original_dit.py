"""Original (facebookresearch/DiT) checkpoints: the converted model, the model ``validate`` rebuilds from
the export's source record, and the float ONNX export all compute the original DiT's forward.

The reference is the original forward written here from scratch, in float64, over the original state
dict: timestep sinusoid ``cos/sin(t * exp(-ln(10000) i / 128))``, i = 0..127, then the timestep MLP; the
label table; adaLN-Zero blocks (``x * (1 + scale) + shift`` after a LayerNorm without affine, eps 1e-6;
fused qkv attention; MLP with tanh GELU; gated residuals); the final adaLN layer; unpatchify; the fixed 2-D
sin-cos position embedding of MAE/DiT. Weights are random with unit gain and non-zero adaLN and final
layers, so every part of the conditioning reaches the output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import ditq
from ditq.exporter.export import META_SOURCE
from ditq.models import load_from_source
from ditq.recipe import LayerQuant, Recipe

HIDDEN, DEPTH, HEADS, PATCH, CHANNELS, SIZE, CLASSES = 64, 2, 4, 2, 4, 16, 10
FREQ_DIM = 256  # the original TimestepEmbedder's frequency_embedding_size
# float32 model vs float64 reference: only fp32 rounding differs. The reference itself run in float32 is
# 2.6e-6 off (mostly the sinusoid's arguments, up to 999 rad); measured 3.0e-6 for the converted model and
# 4.4e-6 for its ONNX export. The timestep-frequency bug this guards against gives 0.32 here.
REL_BOUND = 1e-5


# ------------------------------------------------------------------------ the original DiT, from scratch
def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim]: sin then cos of pos * 10000^(-2k/dim), k = 0..dim/2-1."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """[grid*grid, dim]: the first half encodes the column (w), the second the row (h), row-major tokens."""
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1)


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0, dtype=torch.float64) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype) / half)  # (half,)
    args = t.to(dtype)[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def original_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int, dtype=torch.float64) -> torch.Tensor:
    """The original DiT forward (eval mode: no label dropout), in ``dtype``."""
    p = {k: v.to(dtype) for k, v in sd.items()}

    def linear(h, name):
        return F.linear(h, p[f"{name}.weight"], p[f"{name}.bias"])

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    n, patch = x.shape[0], p["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(x.to(dtype), p["x_embedder.proj.weight"], p["x_embedder.proj.bias"], stride=patch)  # (N, D, H/p, W/p)
    h = h.flatten(2).transpose(1, 2) + p["pos_embed"]  # (N, T, D)
    tokens, dim = h.shape[1], h.shape[2]
    c = linear(F.silu(linear(timestep_sinusoid(t, dtype=dtype), "t_embedder.mlp.0")), "t_embedder.mlp.2")  # (N, D)
    c = c + p["y_embedder.embedding_table.weight"][y]  # (N, D)
    for i in range(1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))):
        b = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(norm(h), shift1, scale1)
        qkv = linear(a, f"{b}.attn.qkv").reshape(n, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, heads, T, D/heads)
        att = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1) @ v
        h = h + gate1[:, None] * linear(att.transpose(1, 2).reshape(n, tokens, dim), f"{b}.attn.proj")
        m = modulate(norm(h), shift2, scale2)
        h = h + gate2[:, None] * linear(F.gelu(linear(m, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(norm(h), shift, scale), "final_layer.linear")  # (N, T, p*p*C_out)
    g, c_out = int(round(tokens**0.5)), h.shape[-1] // (patch * patch)
    h = h.reshape(n, g, g, patch, patch, c_out).permute(0, 5, 1, 3, 2, 4)  # n h w p q c -> n c h p w q
    return h.reshape(n, c_out, g * patch, g * patch)


def random_original_state_dict(hidden=HIDDEN, depth=DEPTH, patch=PATCH, channels=CHANNELS, size=SIZE, classes=CLASSES, seed=0):
    """An original-format DiT state dict (learned sigma: 2x the input channels out), random weights of unit
    gain, non-zero adaLN-Zero and final layers, and the fixed position embedding."""
    g = torch.Generator().manual_seed(seed)

    def lin(name, out_f, in_f):
        sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
        sd[f"{name}.bias"] = 0.1 * torch.randn(out_f, generator=g)

    grid = size // patch
    sd: dict[str, torch.Tensor] = {
        "x_embedder.proj.weight": torch.randn(hidden, channels, patch, patch, generator=g) / math.sqrt(channels * patch * patch),
        "x_embedder.proj.bias": 0.1 * torch.randn(hidden, generator=g),
        "pos_embed": torch.from_numpy(pos_embed_2d(hidden, grid)).float()[None],
        "y_embedder.embedding_table.weight": torch.randn(classes + 1, hidden, generator=g),
    }
    lin("t_embedder.mlp.0", hidden, FREQ_DIM)
    lin("t_embedder.mlp.2", hidden, hidden)
    for i in range(depth):
        lin(f"blocks.{i}.attn.qkv", 3 * hidden, hidden)
        lin(f"blocks.{i}.attn.proj", hidden, hidden)
        lin(f"blocks.{i}.mlp.fc1", 4 * hidden, hidden)
        lin(f"blocks.{i}.mlp.fc2", hidden, 4 * hidden)
        lin(f"blocks.{i}.adaLN_modulation.1", 6 * hidden, hidden)
    lin("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    lin("final_layer.linear", patch * patch * 2 * channels, hidden)
    return sd


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.tensor([1, 250, 500, 999])
    y = torch.tensor([0, 3, 9, CLASSES])  # CLASSES: the CFG null class
    return x, t, y


def rel_err(out, ref) -> float:
    return float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))


@pytest.fixture
def checkpoint():
    return random_original_state_dict()


def save(sd, tmp_path, suffix):
    path = tmp_path / f"DiT-tiny{suffix}"
    if suffix == ".pt":
        torch.save({"ema": sd}, path)
    else:
        save_file(sd, str(path))
    return path


# ------------------------------------------------------------------------------------------ the tests
def test_reference_sinusoid_divides_by_128_not_127():
    """The reference's sinusoid is not diffusers' DiT default (``/ (half - 1)``): 1.24 apart at t = 500."""
    t = torch.tensor([500.0])
    half = FREQ_DIM // 2
    shifted = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - 1))
    buggy = torch.cat([torch.cos(500 * shifted), torch.sin(500 * shifted)])
    assert float((timestep_sinusoid(t)[0] - buggy).abs().max()) > 1.0


def test_diffusers_models_keep_the_diffusers_sinusoid(tmp_path, tiny_dit):
    """Only original checkpoints change the sinusoid: diffusers folders and presets keep shift 1."""
    tiny_dit.save_pretrained(tmp_path / "dit")
    for spec in (str(tmp_path / "dit"), "dit-s-2"):
        model = ditq.load_model(spec).model
        assert {b.norm1.emb.time_proj.downscale_freq_shift for b in model.transformer_blocks} == {1}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_converted_original_checkpoint_computes_the_original_forward(tmp_path, checkpoint, suffix):
    path = save(checkpoint, tmp_path, suffix)
    loaded = ditq.load_model(str(path), num_heads=HEADS)
    x, t, y = inputs()
    ref = original_forward(checkpoint, x, t, y, HEADS)
    with torch.no_grad():
        out = loaded.model(x, timestep=t, class_labels=y, return_dict=False)[0]
    assert out.shape == (4, 2 * CHANNELS, SIZE, SIZE)
    assert rel_err(out, ref) <= REL_BOUND
    # what `ditq validate` rebuilds from the source record an export carries
    rebuilt = load_from_source(json.loads(json.dumps(loaded.source))).model
    with torch.no_grad():
        assert torch.equal(rebuilt(x, timestep=t, class_labels=y, return_dict=False)[0], out)


def test_float_onnx_export_of_an_original_checkpoint_computes_the_original_forward(tmp_path, checkpoint):
    path = save(checkpoint, tmp_path, ".safetensors")
    loaded = ditq.load_model(str(path), num_heads=HEADS)
    qdit = ditq.quantize(loaded.model, Recipe(LayerQuant(wbits=None), ()))  # float: no layer covered
    res = ditq.export(qdit, tmp_path / "fp", source=loaded.source)
    x, t, y = inputs()
    ref = original_forward(checkpoint, x, t, y, HEADS)
    sess = ort.InferenceSession(str(res.model_path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()})
    assert rel_err(torch.from_numpy(out), ref) <= REL_BOUND
    meta = {p.key: p.value for p in onnx.load(str(res.model_path)).metadata_props}
    rebuilt = load_from_source(json.loads(meta[META_SOURCE])).model  # the model validate compares against
    with torch.no_grad():
        assert rel_err(rebuilt(x, timestep=t, class_labels=y, return_dict=False)[0], ref) <= REL_BOUND
