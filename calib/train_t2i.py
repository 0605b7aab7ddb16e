"""Training the shipped ``digits-t2i``: a text-conditioned MMDiT on scikit-learn's digits, rectified flow.

Model: diffusers' ``SD3Transformer2DModel`` (joint attention over 64 image tokens and 16 text tokens, so the
text stream's activations, the joint attention and the velocity output are all there to quantize) and a
small ``CLIPTextModelWithProjection`` trained with it from scratch; its ``last_hidden_state`` is the text
stream, its ``text_embeds`` the pooled projection (the ``DitqDigitsPipeline`` composition of
:class:`ditq.families.sd3.SD3Spec`). Prompts: :mod:`ditq.calib.digits_prompts`; the tokenizer is a
``tokenizers`` WordLevel model over their vocabulary (lower-cased, split at whitespace and punctuation).

Data: the 8x8 training digits in [-1, 1], each pixel repeated 2x2 (16x16): average pooling 2x2 gives the
originals back exactly, which is how the digit judge scores samples (:func:`pool_to_judge`).

Objective (SD3's rectified flow): ``x_s = (1 - s) x0 + s noise``, the model predicts ``noise - x0`` given
``timestep = 1000 s``, with ``s`` logit-normal (``sigmoid(N(0, 1))``); a prompt is dropped to the empty
prompt with probability ``class_dropout`` (classifier-free guidance). Seeded from one ``numpy`` generator
(data order, prompts, ``s``, noise, dropout); resumable from atomic checkpoints of tensors only
(:func:`ditq.calib.train._save_checkpoint`, read with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ditq.calib.digits import load_split
from ditq.calib.digits_prompts import NUM_DIGITS, train_prompts, vocabulary
from ditq.calib.train import TrainConfig, TrainResult, _load_checkpoint, _save_checkpoint, optimizer_step
from ditq.models import pipeline_info
from ditq.runtime.metrics import pool_to

IMAGE_SIZE = 16
MAX_TOKENS = 16  # the tokenizer's and the text encoder's length: BOS, up to 14 words, EOS, padding
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>"
SPECIALS = (PAD, UNK, BOS, EOS)
PIPELINE_CLASS = "DitqDigitsPipeline"
JUDGE = "digits-t2i"  # the pipeline record's judge: the digit judge on 2x2-pooled samples
# The shipped model's training (its model card gives the time on this machine)
DEFAULT_CONFIG = TrainConfig(steps=3000, batch_size=64, lr=1e-3, warmup=200, ema_decay=0.998, save_every=200, seed=0)
LOSS_WINDOW = 100  # the training record's loss: the mean of each 100 steps
WIDTH = 128  # every width of the transformer and the text encoder: group sizes 32, 64 and 128 divide all


def training_data() -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 1, 16, 16] in [-1, 1], labels [N])``: the digits training split, each pixel 2x2."""
    split = load_split()
    return upsample(split.x_train), split.y_train


def upsample(x: np.ndarray) -> np.ndarray:
    """8x8 -> 16x16 by repeating each pixel 2x2 (``[N, C, 8, 8]``)."""
    return np.repeat(np.repeat(np.asarray(x, np.float32), 2, axis=-1), 2, axis=-2)


def pool_to_judge(x: np.ndarray) -> np.ndarray:
    """16x16 -> 8x8 by averaging 2x2 blocks: what the digit judge scores (exactly the inverse of :func:`upsample`)."""
    return pool_to(x, IMAGE_SIZE // 2)


def build_tokenizer():
    """The ``tokenizers`` tokenizer of the prompts: specials, then the vocabulary; BOS ... EOS around each prompt."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate((*SPECIALS, *vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return tok


def fast_tokenizer(tok=None):
    """The transformers wrapper of :func:`build_tokenizer` (what the pipeline folder's ``tokenizer/`` holds)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok or build_tokenizer(), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=MAX_TOKENS)  # fmt: skip


def tokenize(prompts: list[str], tok=None) -> np.ndarray:
    """``[P, MAX_TOKENS]`` int64 ids as the pipeline tokenizes (padded to the maximum length, truncated)."""
    out = fast_tokenizer(tok)(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int64)


def transformer_config(num_layers: int = 4, width: int = WIDTH) -> dict[str, Any]:
    return dict(sample_size=IMAGE_SIZE, patch_size=2, in_channels=1, out_channels=1, num_layers=num_layers,
                attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=width,
                caption_projection_dim=width, pooled_projection_dim=width, pos_embed_max_size=IMAGE_SIZE // 2)  # fmt: skip


def text_config(width: int = WIDTH, layers: int = 2) -> dict[str, Any]:
    vocab = len(SPECIALS) + len(vocabulary())
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, projection_dim=width, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, pad_token_id=SPECIALS.index(PAD),
                bos_token_id=SPECIALS.index(BOS), eos_token_id=SPECIALS.index(EOS), hidden_act="quick_gelu")  # fmt: skip


class DigitsT2I(nn.Module):
    """The transformer and its text encoder, trained together."""

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.transformer, self.text_encoder = transformer, text_encoder

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids=ids)
        return out.last_hidden_state, out.text_embeds

    def forward(self, x: torch.Tensor, s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        hidden, pooled = self.encode(ids)
        return self.transformer(x, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=s * 1000, return_dict=False)[0]


def build_model(seed: int = 0, *, num_layers: int = 4, width: int = WIDTH, text_layers: int = 2) -> DigitsT2I:
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**transformer_config(num_layers, width))
    text = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(width, text_layers)))
    return DigitsT2I(transformer.float().eval(), text.float().eval())


def prompt_bank(tok=None) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Token ids of every training prompt then the empty prompt (last row), and per digit its rows."""
    prompts, rows = [], []
    for d in range(NUM_DIGITS):
        ps = train_prompts(d)
        rows.append(np.arange(len(prompts), len(prompts) + len(ps)))
        prompts += list(ps)
    return torch.from_numpy(tokenize([*prompts, ""], tok)), rows


def train_t2i(model: DigitsT2I, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, checkpoint: str | Path | None = None,
              progress: bool = True) -> TrainResult:  # fmt: skip
    """Train ``model`` on images ``x`` [N, 1, 16, 16] in [-1, 1] with digit labels ``y`` (module docstring)."""
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    rng = np.random.default_rng(cfg.seed)
    start, step_losses = 0, []  # every step's loss (the checkpoint holds them: a resumed run's record is the same)
    ckpt = Path(checkpoint) if checkpoint else None
    before = 0.0  # training seconds of the runs the checkpoint continues
    if ckpt and ckpt.is_file():
        start, step_losses, rng = _load_checkpoint(ckpt, cfg, model, ema, opt)
        before = _checkpoint_seconds(ckpt)
    ids, rows = prompt_bank()
    empty = len(ids) - 1
    xt_all = torch.from_numpy(np.array(x, np.float32))
    n = len(xt_all)
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="train digits-t2i", unit="step", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        idx = rng.integers(0, n, cfg.batch_size)  # (B,) images
        pick = np.array([rows[int(y[i])][rng.integers(0, len(rows[int(y[i])]))] for i in idx])  # (B,) prompt rows
        pick[rng.random(cfg.batch_size) < cfg.class_dropout] = empty
        s = torch.from_numpy((1 / (1 + np.exp(-rng.standard_normal(cfg.batch_size)))).astype(np.float32))  # (B,) logit-normal
        noise = torch.from_numpy(rng.standard_normal((cfg.batch_size, *xt_all.shape[1:])).astype(np.float32))  # (B, 1, 16, 16)
        x0 = xt_all[idx]
        sv = s.view(-1, 1, 1, 1)
        out = model((1 - sv) * x0 + sv * noise, s, ids[torch.from_numpy(pick)])  # (B, 1, 16, 16) velocity
        loss = torch.mean((out - (noise - x0)) ** 2)
        optimizer_step(model, ema, opt, cfg, step, loss)
        step_losses.append(loss.item())
        if (step + 1) % LOSS_WINDOW == 0:
            bar.set_postfix(loss=f"{np.mean(step_losses[-LOSS_WINDOW:]):.4f}")
        if ckpt and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            _save_checkpoint(ckpt, cfg, step + 1, step_losses, rng, model, ema, opt, seconds=before + time.perf_counter() - t0)
    bar.close()
    losses = [float(np.mean(step_losses[i : i + LOSS_WINDOW])) for i in range(0, len(step_losses) - LOSS_WINDOW + 1, LOSS_WINDOW)]
    return TrainResult(ema.eval(), losses, cfg.steps, before + time.perf_counter() - t0)


def _checkpoint_seconds(path: Path) -> float:
    """The training time a checkpoint records (0 when it records none)."""
    seconds = torch.load(path, map_location="cpu", weights_only=True).get("seconds", 0.0)
    return float(seconds) if isinstance(seconds, float) and np.isfinite(seconds) and seconds >= 0 else 0.0


@torch.no_grad()
def sample_torch(model: DigitsT2I, prompts: list[str], *, steps: int = 28, guidance: float = 4.0, seed: int = 0,
                 batch: int = 250) -> np.ndarray:  # fmt: skip
    """Reference sampler in torch: flow-matching Euler over ``sigmas = linspace(1, 1/1000, steps)`` then 0
    (FlowMatchEulerDiscreteScheduler's grid at shift 1), classifier-free guidance ``v_u + g (v_c - v_u)`` with the empty prompt,
    from seeded noise; final images clipped to [-1, 1]."""
    ids = torch.from_numpy(tokenize([*prompts, ""]))
    hidden, pooled = model.encode(ids)
    noise = np.random.default_rng(seed).standard_normal((len(prompts), 1, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    sig = np.append(np.linspace(1.0, 1e-3, steps), 0.0).astype(np.float32)
    out = []
    for i in range(0, len(prompts), batch):
        x = torch.from_numpy(noise[i : i + batch])
        b = len(x)
        h = torch.cat([hidden[i : i + b], hidden[-1:].expand(b, -1, -1)])
        p = torch.cat([pooled[i : i + b], pooled[-1:].expand(b, -1)])
        for k in range(steps):
            t = torch.full((2 * b,), float(sig[k]) * 1000)
            v = model.transformer(torch.cat([x, x]), encoder_hidden_states=h, pooled_projections=p, timestep=t, return_dict=False)[0]
            vc, vu = v[:b], v[b:]
            x = x + float(sig[k + 1] - sig[k]) * (vu + guidance * (vc - vu))
        out.append(x.clamp(-1, 1).numpy())
    return np.concatenate(out)


def save_pipeline(model: DigitsT2I, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as the ``DitqDigitsPipeline`` folder (transformer, text encoder, tokenizer, scheduler,
    model_index.json; ``training.json`` with ``info``) into ``folder`` (created if missing)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    model.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    fast_tokenizer().save_pretrained(folder / "tokenizer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(folder / "scheduler")
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": __import__("diffusers").__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers", "SD3Transformer2DModel"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if info is not None:
        (folder / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    # how ditq samples and judges it: pixel space in [-1, 1], the folder's scheduler and text encoder
    read = pipeline_info({"kind": "diffusers", "path": str(folder)})
    replace(read, space="pixel", value_range=(-1.0, 1.0), judge=JUDGE).write_to(folder)
    return folder
