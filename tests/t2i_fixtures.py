"""Tiny whole text-to-image pipelines, random init from a seed, saved by diffusers' ``save_pretrained``:
Stable Diffusion 3, PixArt-Sigma (or -alpha) and Flux, each loadable by ``DiffusionPipeline.from_pretrained``
and run end to end by diffusers in seconds.

The transformers are the shapes every test of issue 15 uses; the text encoders are tiny CLIP and T5 models
whose widths fit them; the tokenizers are ``tokenizers`` WordLevel tokenizers over :data:`WORDS` (whitespace
pre-tokenizer, the special tokens of CLIP or T5 added by a template) wrapped in transformers'
``PreTrainedTokenizerFast``, so diffusers' pipelines call them as they call the real ones.

==========  ===========================================================================================
SD3         CLIP-L-like ``text_encoder`` (hidden 8, projection 16, pads with its end token) and
            CLIP-G-like ``text_encoder_2`` (hidden 16, projection 32, pads with ``!``): pooled 16 + 32 = 48
            = pooled_projection_dim, hidden states 8 + 16 = 24 zero-padded to T5's 32 = joint_attention_dim;
            T5 ``text_encoder_3`` (d_model 32); FlowMatchEulerDiscreteScheduler (shift 3); a VAE of 4 latent
            channels with SD3's scaling and shift factors
PixArt      T5 ``text_encoder`` (d_model 32 = caption_channels); DDIMScheduler; a VAE without shift
Flux        CLIP ``text_encoder`` (hidden 48 = pooled_projection_dim) and T5 ``text_encoder_2`` (32 =
            joint_attention_dim); FlowMatchEulerDiscreteScheduler with Flux's dynamic shifting; a VAE of 4
            latent channels (the transformer's 16 = 4 x 2 x 2 packed) with Flux's factors
==========  ===========================================================================================
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

# Words the tokenizers know; any other word is the unknown token.
WORDS = ("a an the of on in with and photo painting drawing picture cat dog bird fish horse tree house car boat "
         "sky sea river mountain city forest red green blue yellow black white big small old young happy sad "
         "sunny night morning snow rain dark bright").split()  # fmt: skip

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<unk>", "!")  # bos, eos, unknown, CLIP-G's padding
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # pad 0, eos 1, unknown 2 (T5's ids)
CLIP_TOKENS = 77

SD3_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
                       joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=48, out_channels=4,
                       pos_embed_max_size=32)  # fmt: skip
PIXART_TRANSFORMER = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=4, caption_channels=32,
                          in_channels=4, cross_attention_dim=64, out_channels=8, attention_bias=True,
                          activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                          norm_elementwise_affine=False, norm_eps=1e-6)  # fmt: skip
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
                        joint_attention_dim=32, pooled_projection_dim=48, axes_dims_rope=(4, 6, 6), guidance_embeds=True)  # fmt: skip
T5_CONFIG = dict(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=1000, relative_attention_num_buckets=8,
                 decoder_start_token_id=0)  # fmt: skip


def word_tokenizer(kind: str, *, pad: str | None = None, model_max_length: int = CLIP_TOKENS):
    """A WordLevel tokenizer over :data:`WORDS` in transformers' ``PreTrainedTokenizerFast``: ``kind`` "clip"
    (lower-cased, ``<|startoftext|> $A <|endoftext|>``, padded with ``pad``, default the end token) or "t5"
    (``$A </s>``, padded with ``<pad>``)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = CLIP_SPECIALS if kind == "clip" else T5_SPECIALS
    vocab = {t: i for i, t in enumerate((*specials, *WORDS))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "clip":
        bos, eos = CLIP_SPECIALS[:2]
        tok.normalizer = normalizers.Lowercase()
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, 0), (eos, 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token=pad or eos,
                                       model_max_length=model_max_length)  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=512)


def _seeded(seed: int, build):
    """``build()`` with torch's global generator seeded, and restored afterwards (model constructors draw from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _save(pipe, folder: str | Path) -> Path:
    """``pipe.save_pretrained(folder)`` without its progress bars (a test's captured output stays its own)."""
    with contextlib.redirect_stderr(io.StringIO()):
        pipe.save_pretrained(folder)
    return Path(folder)


def clip_encoder(seed: int, *, hidden: int, heads: int, projection: int | None = None):
    """A tiny CLIP text encoder (``CLIPTextModelWithProjection`` when ``projection``), 2 layers, ids of
    :func:`word_tokenizer` ("clip"): end token 1 (pooled at its first occurrence), padding as the tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=2, intermediate_size=37,
                            projection_dim=projection or hidden, vocab_size=1000, max_position_embeddings=CLIP_TOKENS,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")  # fmt: skip
    return _seeded(seed, lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(config))


def t5_encoder(seed: int):
    """A tiny ``T5EncoderModel`` (d_model 32, 2 layers of 4 heads)."""
    from transformers import T5Config, T5EncoderModel

    return _seeded(seed, lambda: T5EncoderModel(T5Config(**T5_CONFIG)))


def tiny_vae(seed: int, *, scaling_factor: float, shift_factor: float | None):
    """A tiny ``AutoencoderKL``: 4 latent channels, two blocks (8x8 latents -> 16x16 images)."""
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    ))  # fmt: skip


def sd3_pipeline(folder: str | Path, seed: int = 0, *, t5: bool = True) -> Path:
    """A tiny ``StableDiffusion3Pipeline`` saved in ``folder`` (without ``t5``: built without its T5 encoder,
    which the pipeline replaces by zeros); returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=_seeded(seed, lambda: SD3Transformer2DModel(**SD3_TRANSFORMER)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed + 1, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip_encoder(seed + 2, hidden=8, heads=2, projection=16), tokenizer=word_tokenizer("clip"),
        text_encoder_2=clip_encoder(seed + 3, hidden=16, heads=4, projection=32), tokenizer_2=word_tokenizer("clip", pad="!"),
        text_encoder_3=t5_encoder(seed + 4) if t5 else None, tokenizer_3=word_tokenizer("t5") if t5 else None,
    )  # fmt: skip
    return _save(pipe, folder)


def pixart_pipeline(folder: str | Path, seed: int = 0, *, sigma: bool = True) -> Path:
    """A tiny ``PixArtSigmaPipeline`` (``PixArtAlphaPipeline`` without ``sigma``) saved in ``folder``."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(
        transformer=_seeded(seed, lambda: PixArtTransformer2DModel(**PIXART_TRANSFORMER)),
        scheduler=DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        vae=tiny_vae(seed + 1, scaling_factor=0.18215, shift_factor=None),
        text_encoder=t5_encoder(seed + 2), tokenizer=word_tokenizer("t5"),
    )  # fmt: skip
    return _save(pipe, folder)


def flux_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ``FluxPipeline`` saved in ``folder``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline(
        transformer=_seeded(seed, lambda: FluxTransformer2DModel(**FLUX_TRANSFORMER)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),  # fmt: skip
        vae=tiny_vae(seed + 1, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=clip_encoder(seed + 2, hidden=48, heads=4), tokenizer=word_tokenizer("clip"),
        text_encoder_2=t5_encoder(seed + 3), tokenizer_2=word_tokenizer("t5"),
    )  # fmt: skip
    return _save(pipe, folder)


BUILDERS = {"sd3": sd3_pipeline, "sd3-no-t5": lambda folder, seed=0: sd3_pipeline(folder, seed, t5=False), "pixart": pixart_pipeline,
            "flux": flux_pipeline}  # fmt: skip


def digits_t2i_like(tmp, seed: int = 0):
    """A random-weights pipeline folder of the shipped ``digits-t2i``'s layout (``DitqDigitsPipeline``: SD3
    transformer, one CLIP with projection, WordLevel tokenizer, flow-matching scheduler, ditq's pipeline
    record), tiny: width 64, two blocks, two text layers."""
    from pathlib import Path

    from ditq.calib.train_t2i import build_model, save_pipeline

    return save_pipeline(build_model(seed, num_layers=2, width=64, text_layers=2), Path(tmp) / f"digits-t2i-like-{seed}")
