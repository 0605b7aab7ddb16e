"""The shipped text-conditioned ``digits-t2i`` (issue 16): its prompts, its tokenizer, its pipeline folder,
its export and prompt sampling in ONNX Runtime alone, and its trainer.

References are independent of ditq: the tokenizer's ids are transformers' ``PreTrainedTokenizerFast`` reading
the shipped ``tokenizer/`` folder and ids written out from the vocabulary by hand; the ONNX Runtime sampler
is checked against a PyTorch sampler built here from diffusers' ``SD3Transformer2DModel``, transformers'
``CLIPTextModelWithProjection`` and diffusers' ``FlowMatchEulerDiscreteScheduler`` (what
``StableDiffusion3Pipeline`` does each step: the ``[empty prompt, prompt]`` batch, ``timestep`` = the
scheduler's, ``v_u + g (v_c - v_u)``, ``scheduler.step``). Both run float32 in a different order (ONNX Runtime's
fused kernels against torch's), so they differ by rounding only: the bound is issue 15's 80 dB per step (a wrong
input, timestep, guidance or schedule step costs tens of dB).
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import ditq.calib.train_t2i as t2i
from ditq.calib.digits_prompts import NUM_DIGITS, held_out_prompts, prompt_for, train_prompts, vocabulary
from ditq.calib.train import TrainConfig
from ditq.manifest import read_manifest, verify_files
from ditq.models import BUILTIN, load_model
from ditq.pipeline import Pipeline

from .conftest import assert_one_line_refusal, run

SHIPPED = BUILTIN["digits-t2i"]
REPO = Path(__file__).resolve().parents[1]
FLOOR_DB = 80.0  # see the module docstring
FLOAT_RECIPE = {"format": "ditq-recipe", "version": 1, "method": "rtn",
                "default": {"wbits": None, "abits": None, "group_size": None, "symmetric": False}, "rules": []}  # fmt: skip
SPECIALS = ("[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>")  # ids 0..3, then the vocabulary in order


def _db(ref: np.ndarray, x: np.ndarray) -> float:
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return float(10 * np.log10((ref**2).sum() / max(((ref - x) ** 2).sum(), 1e-300)))


# ------------------------------------------------------------------------------------------- prompts
def test_held_out_prompts_are_never_training_prompts_and_use_only_known_words():
    train = {p for d in range(NUM_DIGITS) for p in train_prompts(d)}
    held = {p for d in range(NUM_DIGITS) for p in held_out_prompts(d)}
    assert len(train) == sum(len(train_prompts(d)) for d in range(NUM_DIGITS))  # no prompt names two digits
    assert not train & held
    train_words = {w for p in train for w in p.lower().split()}
    held_words = {w for p in held for w in p.lower().split()}
    assert held_words <= train_words  # every held-out word has a trained embedding
    assert set(vocabulary()) == train_words | held_words and list(vocabulary()) == sorted(vocabulary())


def test_prompt_for_cycles_through_each_split_deterministically():
    for d in range(NUM_DIGITS):
        for split, prompts in (("train", train_prompts(d)), ("held-out", held_out_prompts(d))):
            assert [prompt_for(d, i, split) for i in range(2 * len(prompts))] == list(prompts) * 2


# ----------------------------------------------------------------------------------------- tokenizer
def _hand_ids(prompt: str) -> list[int]:
    """BOS, each lower-cased word's id (unknown: [UNK]), EOS, then [PAD] to 16; cut to 14 words."""
    vocab = {t: i for i, t in enumerate((*SPECIALS, *vocabulary()))}
    words = [vocab.get(w, 1) for w in prompt.lower().split()]
    ids = [2, *words[:14], 3]
    return ids + [0] * (16 - len(ids))


TOKEN_CASES = ["", "a handwritten 3", "A HANDWRITTEN 3", "a handwritten banana", "seven written by hand",
               " ".join(["seven"] * 20)]  # fmt: skip


def test_tokenizer_ids_equal_transformers_and_the_vocabulary_written_out():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    record = Pipeline.read_from(SHIPPED).text[0]
    ours = record.configured(Tokenizer.from_file(str(SHIPPED / "tokenizer" / "tokenizer.json")))
    theirs = PreTrainedTokenizerFast.from_pretrained(str(SHIPPED / "tokenizer"))
    prompts = [p for d in range(NUM_DIGITS) for p in (*train_prompts(d), *held_out_prompts(d))] + TOKEN_CASES
    ids, mask = record.tokenize(ours, prompts)
    want = theirs(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    for p, row in zip(TOKEN_CASES, ids[-len(TOKEN_CASES) :]):
        assert row.tolist() == _hand_ids(p), p
    assert 1 not in ids[: -len(TOKEN_CASES)]  # no prompt of either split has an unknown word


# ------------------------------------------------------------------------------------ shipped folder
def test_the_shipped_folder_loads_with_the_contract_shapes():
    loaded = load_model("digits-t2i")
    cfg = loaded.model.config
    assert type(loaded.model).__name__ == "SD3Transformer2DModel"
    assert (cfg.sample_size, cfg.patch_size, cfg.in_channels, cfg.out_channels) == (16, 2, 1, 1)
    assert (cfg.num_attention_heads * cfg.attention_head_dim, cfg.joint_attention_dim, cfg.caption_projection_dim,
            cfg.pooled_projection_dim, cfg.pos_embed_max_size) == (128, 128, 128, 128, 8)  # fmt: skip
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    pipe = loaded.pipeline
    assert (pipe.space, pipe.value_range, pipe.judge) == ("pixel", (-1.0, 1.0), "digits-t2i")
    assert [(t.folder, t.kind, t.max_length) for t in pipe.text] == [("text_encoder", "clip-projection", 16)]
    index = json.loads((SHIPPED / "model_index.json").read_text())
    assert index["_class_name"] == "DitqDigitsPipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"] and index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    text = json.loads((SHIPPED / "text_encoder" / "config.json").read_text())
    vocab = json.loads((SHIPPED / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert (text["hidden_size"], text["projection_dim"], text["num_hidden_layers"], text["num_attention_heads"],
            text["intermediate_size"], text["max_position_embeddings"]) == (128, 128, 2, 4, 256, 16)  # fmt: skip
    assert text["vocab_size"] == len(vocab) and text["eos_token_id"] == vocab["<|endoftext|>"]  # CLIP pools at EOS
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total < 8 << 20, total


def test_the_shipped_manifest_lists_every_file_and_the_wheel_carries_them():
    manifest = read_manifest(SHIPPED)
    assert manifest["kind"] == "digits-t2i-model"
    on_disk = {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk and verify_files(SHIPPED, manifest) == []
    assert {"README.md", "training.json", "tokenizer/tokenizer.json", "text_encoder/model.safetensors"} <= on_disk
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ditq"]
    for name in [*on_disk, "manifest.json"]:  # setuptools' globs: "*" never crosses a "/"
        rel = f"assets/digits-t2i/{name}"
        assert any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in patterns), rel


# ------------------------------------------------------------------- export, ONNX Runtime sampling
@pytest.fixture(scope="module")
def float_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-t2i")
    (root / "float.json").write_text(json.dumps(FLOAT_RECIPE))
    from ditq.cli import main

    assert main(["--quiet", "export", "--model", "digits-t2i", "--recipe", str(root / "float.json"), "--out", str(root / "fp")]) == 0
    return root / "fp"


def _torch_reference(noise: np.ndarray, prompt: str, *, steps: int, guidance: float) -> tuple[list[np.ndarray], np.ndarray]:
    """StableDiffusion3Pipeline's loop, written out, on the shipped folder: (each transformer call's output, x)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(SHIPPED / "tokenizer"))
    clip = CLIPTextModelWithProjection.from_pretrained(str(SHIPPED / "text_encoder"), torch_dtype=torch.float32).eval()
    transformer = SD3Transformer2DModel.from_pretrained(str(SHIPPED / "transformer"), torch_dtype=torch.float32).eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(SHIPPED / "scheduler"))
    sched.set_timesteps(steps)
    b = len(noise)
    with torch.no_grad():
        ids = torch.from_numpy(tok(["", prompt], padding="max_length", max_length=16, truncation=True, return_tensors="np")["input_ids"])
        enc = clip(input_ids=ids)
        hidden = enc.last_hidden_state.repeat_interleave(b, 0)  # (2B, 16, 128): B x "", B x prompt
        pooled = enc.text_embeds.repeat_interleave(b, 0)  # (2B, 128)
        x, outs = torch.from_numpy(noise), []
        for t in sched.timesteps:
            v = transformer(torch.cat([x, x]), encoder_hidden_states=hidden, pooled_projections=pooled,
                            timestep=t.expand(2 * b), return_dict=False)[0]  # fmt: skip
            outs.append(v.numpy().copy())
            vu, vc = v.chunk(2)
            x = sched.step(vu + guidance * (vc - vu), t, x, return_dict=False)[0]
    return outs, x.numpy()


@pytest.mark.slow  # exports the shipped model (about 20 s)
def test_onnx_runtime_float_sampling_matches_a_torch_sampler_step_for_step(float_export):
    from ditq.runtime.text2image import TextToImageModel

    model = TextToImageModel.open(float_export)
    ours, run_feeds = [], model.fn.run_feeds
    model.fn.run_feeds = lambda feeds: ours.append(run_feeds(feeds)) or ours[-1]
    noise = np.random.default_rng(3).standard_normal((4, 1, 16, 16)).astype(np.float32)
    x = model.generate("a handwritten 3", noise=noise, steps=8, guidance=4.0, batch_size=4)
    theirs, ref = _torch_reference(noise, "a handwritten 3", steps=8, guidance=4.0)
    assert len(ours) == len(theirs) == 8
    for i, (a, b) in enumerate(zip(theirs, ours)):
        assert a.shape == b.shape == (8, 1, 16, 16) and _db(a, b) >= FLOOR_DB, f"step {i}: {_db(a, b):.1f} dB"
    assert _db(ref, x) >= FLOOR_DB, _db(ref, x)


def _run_without_torch(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter where torch, diffusers and transformers cannot be imported."""
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "diffusers", "transformers"):
            sys.modules[name] = None  # importing it now raises ImportError
        from ditq.cli import main
        rc = main({args!r})
        assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in ("torch", "diffusers", "transformers")]
        sys.exit(rc)
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.slow  # exports the shipped model (about 20 s)
def test_export_writes_the_text_encoder_and_samples_a_prompt_without_torch(float_export, tmp_path):
    from PIL import Image

    assert {"model.onnx", "text_encoder.onnx", "tokenizer.json"} <= {p.name for p in float_export.iterdir()}
    png = tmp_path / "three.png"
    r = _run_without_torch(["--quiet", "sample", str(float_export), "--prompt", "a handwritten 3", "--steps", "4",
                            "--images", "2", "--out", str(png)])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(png).size[0] >= 32


# -------------------------------------------------------------------------------------------- trainer
def _tiny_run(tmp_path: Path, ckpt: Path | None, cfg: TrainConfig):
    x, y = t2i.training_data()
    model = t2i.build_model(0, num_layers=1, width=64, text_layers=1)
    return t2i.train_t2i(model, x[:40], y[:40], cfg, checkpoint=ckpt, progress=False)


def test_training_interrupted_and_resumed_equals_an_uninterrupted_run_exactly(tmp_path, monkeypatch):
    """Killed right after its step-2 checkpoint and restarted with the same arguments, a run ends with the
    weights, optimizer state and per-step losses of a run never interrupted (all randomness is seeded state)."""
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup=1, save_every=2, seed=3)
    straight = _tiny_run(tmp_path, tmp_path / "straight.pt", cfg)
    real_save = t2i._save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(t2i, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path, tmp_path / "resumed.pt", cfg)
    monkeypatch.setattr(t2i, "_save_checkpoint", real_save)
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 2
    resumed = _tiny_run(tmp_path, tmp_path / "resumed.pt", cfg)
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("straight.pt", "resumed.pt"))
    assert a["step"] == b["step"] == 4 and len(a["losses"]) == 4 and a["losses"] == b["losses"]
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0)
    got = resumed.ema.state_dict()
    for k, v in straight.ema.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_a_bad_training_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "run.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run(["train-digits-t2i", "--steps", "2", "--out", str(tmp_path / "out"), "--checkpoint", str(bad)], capsys)
    assert_one_line_refusal(code, err, "unreadable training checkpoint")
    assert not (tmp_path / "out").exists() and bad.read_bytes() == b"not a checkpoint"


def test_a_checkpoint_of_other_settings_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    _tiny_run(tmp_path, ckpt, TrainConfig(steps=1, batch_size=2, save_every=1))
    code, _, err = run(["train-digits-t2i", "--steps", "2", "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt)], capsys)
    assert_one_line_refusal(code, err, "different training settings")


def test_an_unknown_model_name_is_one_line(tmp_path, capsys):
    code, _, err = run(["export", "--model", "digits-t3i", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "digits-t3i", "digits-t2i")


def test_retraining_writes_a_ditq_folder_and_keeps_its_model_card(tmp_path):
    """``ditq train-digits-t2i`` writes the pipeline folder with its manifest; run again over it (what
    ``make train-digits-t2i`` does to the shipped folder), it keeps the model card; the torch thread count
    is restored."""
    from ditq.manifest import write_manifest
    from ditq.workflows.train_t2i import train_digits_t2i

    cfg, out, threads = TrainConfig(steps=1, batch_size=2, save_every=1), tmp_path / "m", torch.get_num_threads()
    train_digits_t2i(out, cfg)
    assert read_manifest(out)["kind"] == "digits-t2i-model" and not (out / "README.md").exists()
    (out / "README.md").write_text("# the card\n")
    write_manifest(out, {"kind": "digits-t2i-model"})
    res = train_digits_t2i(out, cfg)
    assert (out / "README.md").read_text() == "# the card\n" and verify_files(out, read_manifest(out)) == []
    assert res.steps == 1 and torch.get_num_threads() == threads
