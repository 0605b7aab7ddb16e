"""Loading DiTs: presets, diffusers folders, original DiT checkpoints (.pt and .safetensors), bad files."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ditq.errors import DitqError
from ditq.models import PRESETS, build_dit, load_model
from tests.conftest import tiny_config


def outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([3, 900]), class_labels=torch.tensor([1, c.num_embeds_ada_norm])).sample


def to_original_layout(model) -> dict:
    """The facebookresearch/DiT state dict of a diffusers DiT (written independently of the loader):
    one shared t/y embedder, fused qkv, fixed pos_embed buffer."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    depth = model.config.num_layers
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    tokens = (model.config.sample_size // model.config.patch_size) ** 2
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": torch.zeros(1, tokens, hidden),
        "t_embedder.mlp.0.weight": sd["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd["transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd["transformer_blocks.0.norm1.emb.timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"], "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"],
    }  # fmt: skip
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"{b}attn1.to_{n}.{p}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{p}"] = sd[f"{b}attn1.to_out.0.{p}"]
            out[f"blocks.{i}.mlp.fc1.{p}"] = sd[f"{b}ff.net.0.proj.{p}"]
            out[f"blocks.{i}.mlp.fc2.{p}"] = sd[f"{b}ff.net.2.{p}"]
            out[f"blocks.{i}.adaLN_modulation.1.{p}"] = sd[f"{b}norm1.linear.{p}"]
    return out


@pytest.fixture
def shared_embedder_dit():
    """A tiny DiT whose per-block embedders are identical, as in a converted original checkpoint."""
    m = build_dit(tiny_config(hidden=64, heads=4), seed=3)
    emb0 = m.transformer_blocks[0].norm1.emb
    for blk in m.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(emb0.state_dict())
    return m


def test_presets_are_the_dit_paper_shapes_and_seeded():
    assert PRESETS["dit-xl-2"] == (1152, 28, 16) and PRESETS["dit-s-2"] == (384, 12, 6)
    a, b, c = (load_model("dit-s-2", seed=s).model for s in (0, 0, 1))
    assert a.config.num_layers == 12 and a.config.attention_head_dim * a.config.num_attention_heads == 384
    assert a.config.out_channels == 8 and a.config.num_embeds_ada_norm == 1000 and a.config.sample_size == 32
    wa, wb, wc = (m.transformer_blocks[0].attn1.to_q.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("pipeline", [False, True])
def test_diffusers_folder(tmp_path, tiny_dit, pipeline):
    folder = tmp_path / "dit"
    target = folder / "transformer" if pipeline else folder
    tiny_dit.save_pretrained(target)
    if pipeline:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    assert (target / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_model(str(folder))
    assert loaded.source["kind"] == "diffusers" and len(loaded.source["sha256"]) == 64
    assert torch.equal(outputs(loaded.model), outputs(tiny_dit))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_original_checkpoint(tmp_path, shared_embedder_dit, suffix):
    sd = to_original_layout(shared_embedder_dit)
    path = tmp_path / f"DiT-tiny{suffix}"
    if suffix == ".pt":
        torch.save({"model": sd, "ema": sd}, path)  # a training checkpoint: the EMA weights are taken
    else:
        save_file(sd, str(path))
    loaded = load_model(str(path), image_size=None, num_heads=4)
    assert loaded.source["kind"] == "dit-checkpoint"
    assert loaded.model.config.sample_size == 8 and loaded.model.config.num_layers == 2
    for blk in shared_embedder_dit.transformer_blocks:  # the original DiT's timestep sinusoid (test_original_dit.py)
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
    torch.testing.assert_close(outputs(loaded.model), outputs(shared_embedder_dit), rtol=0, atol=0)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch ditq-pickle-ran",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, shared_embedder_dit, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd = to_original_layout(shared_embedder_dit)
    sd["evil"] = Payload()
    path = tmp_path / "evil.pt"
    torch.save(sd, path)
    with pytest.raises(DitqError, match="refused to load"):
        load_model(str(path), num_heads=4)
    assert not (tmp_path / "ditq-pickle-ran").exists()


def test_bad_files(tmp_path):
    with pytest.raises(DitqError, match="neither a built-in model"):
        load_model(str(tmp_path / "nope.pt"))
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DitqError, match="corrupt safetensors"):
        load_model(str(bad))
    badpt = tmp_path / "corrupt.pt"
    badpt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DitqError, match="corrupt or unreadable"):
        load_model(str(badpt))
    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(DitqError, match="unsupported architecture"):
        load_model(str(other))
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(DitqError, match="unsupported architecture 'UNet2DConditionModel'"):
        load_model(str(unet))


def test_image_size_must_match_the_checkpoint(tmp_path, shared_embedder_dit):
    path = tmp_path / "dit.safetensors"
    save_file(to_original_layout(shared_embedder_dit), str(path))
    with pytest.raises(DitqError, match="does not match"):
        load_model(str(path), image_size=256, num_heads=4)
