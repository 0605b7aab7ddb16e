"""The PixArt family, torch-free half: diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha and PixArt-Sigma).

Signature (the graph's inputs, in order; ``B`` batch and ``T`` text tokens dynamic)::

    hidden_states          [B, C, H, W] float   latents, H = W = sample_size (fixed, see below)
    encoder_hidden_states  [B, T, D]    float   T5's last hidden state (D = caption_channels)
    encoder_attention_mask [B, T]       int64   the tokenizer's attention mask: 1 a token, 0 padding
    timestep               [B]          int64   the scheduler's (DDPM) timestep, 0..999
    resolution             [B, 2]       float   (height, width) of the image in pixels     } only when the model
    aspect_ratio           [B, 1]       float   height / width                             } uses them (below)
    -> out                 [B, C', H, W] float  epsilon; C' = 2C with the learned-sigma variance values

The mask is int64 because that is what the T5 tokenizer gives and the T5 encoder reads: the same array
feeds both. The model turns it into the additive bias ``(1 - mask) * -10000`` of its cross-attention.

The resolution/aspect-ratio micro-conditions exist when the config's ``use_additional_conditions`` is true,
or, unset (``null``), when ``sample_size`` is 128: diffusers' own rule (:func:`uses_additional_conditions`);
PixArt-alpha at 1024 px has them, PixArt-Sigma does not. ``PixArtAlphaPipeline`` passes them when
``sample_size`` is 128, as ``[height, width]`` and ``height / width`` of the (binned) image, which is the
latents' size times the VAE's factor 8.

Image size: the graph is traced at ``sample_size`` and holds the sin-cos position table of that size, so its
latent height and width are fixed (multi-scale checkpoints sample other aspect ratios in diffusers; a graph
serves one). Batch and text length are dynamic.

Text: one T5 encoder (``text_encoder/``, ``tokenizer/``). The prompt is padded and truncated to
``max_sequence_length`` tokens, which is the pipeline's, not the transformer's: ``PixArtAlphaPipeline``
120, ``PixArtSigmaPipeline`` (and its PAG variant) 300. Both pipelines use the same transformer class and
no transformer config field tells them apart, so :meth:`PixArtSpec.text_encoders_for` decides from the
pipeline folder's ``model_index.json`` class name. Before tokenizing, both pipelines lower-case and strip
the prompt (:meth:`PixArtSpec.prompt_text`; their optional caption cleaning needs ``bs4`` and ``ftfy``,
without which diffusers does exactly this).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from ditq.errors import DitqError, shown
from ditq.families import FamilySpec, TextEncoderSpec, register
from ditq.untrusted import MAX_HIDDEN, Bool, Float, Int, OneOf, check_fields, check_width

# The keyword arguments of PixArtTransformer2DModel with its defaults (PixArt-alpha/Sigma XL-2: 28 blocks of
# 16 heads of 72, T5-XXL captions of 4096). The bounds are far beyond any published PixArt and keep a hostile
# config from asking for an absurd model; what a bound cannot say is checked in :func:`check_pixart_config`.
PIXART_CONFIG: dict[str, Any] = {
    "num_attention_heads": Int(1, 256, 16),
    "attention_head_dim": Int(1, 1024, 72),
    "in_channels": Int(1, 1024, 4),
    "out_channels": Int(1, 2048, 8, nullable=True),
    "num_layers": Int(1, 512, 28),
    "dropout": Float(0.0, 1.0, 0.0),
    "norm_num_groups": Int(1, 1024, 32),
    "cross_attention_dim": Int(1, MAX_HIDDEN, 1152, nullable=True),
    "attention_bias": Bool(True),
    "sample_size": Int(1, 512, 128),
    "patch_size": Int(1, 64, 2),
    "activation_fn": OneOf(("gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu", "linear-silu"), "gelu-approximate"),
    "num_embeds_ada_norm": Int(1, 1_000_000, 1000),  # the constructor refuses null
    "upcast_attention": Bool(False),
    "norm_type": OneOf(("ada_norm_single",), "ada_norm_single"),
    "norm_elementwise_affine": Bool(False),
    "norm_eps": Float(0.0, 1.0, 1e-6, open_lo=True),
    "interpolation_scale": Float(1 / 64, 64.0, None, nullable=True),  # Sigma: 0.5 (256 px) .. 4 (2K)
    "use_additional_conditions": Bool(None, nullable=True),  # null: sample_size == 128 (diffusers' rule)
    "caption_channels": Int(1, 65536, None, nullable=True),
    "attention_type": OneOf(("default", None), "default"),  # "gated" (GLIGEN) is not a PixArt checkpoint
}
ADDITIONAL_CONDITIONS = ("resolution", "aspect_ratio")
VAE_SCALE_FACTOR = 8  # pixels per latent of every PixArt VAE: the resolution micro-condition's unit
ALPHA_TEXT_TOKENS = 120  # PixArtAlphaPipeline's max_sequence_length
# max_sequence_length of the diffusers pipelines that drive a PixArtTransformer2DModel, by class name
PIPELINE_TEXT_TOKENS = {"PixArtAlphaPipeline": ALPHA_TEXT_TOKENS, "PixArtSigmaPipeline": 300, "PixArtSigmaPAGPipeline": 300}


def uses_additional_conditions(config: Mapping[str, Any]) -> bool:
    """Whether a model of ``config`` takes the resolution/aspect-ratio micro-conditions: its
    ``use_additional_conditions``, or, unset, ``sample_size == 128`` (as the diffusers constructor decides)."""
    use = config.get("use_additional_conditions")
    return bool(use) if use is not None else config.get("sample_size") == 128


def text_width(config: Mapping[str, Any]) -> int:
    """The width ``D`` of ``encoder_hidden_states``: ``caption_channels`` (projected to the hidden width by
    ``caption_projection``), else ``cross_attention_dim`` (read by the cross-attention as it is)."""
    return int(config["caption_channels"] if config.get("caption_channels") is not None else config["cross_attention_dim"])


def check_pixart_config(obj: Any, where: str) -> dict[str, Any]:
    """The ``PixArtTransformer2DModel`` keyword arguments of a config object (other keys dropped), every field
    checked against :data:`PIXART_CONFIG`, ``use_additional_conditions`` resolved to true or false, and what
    ditq cannot export or sample refused in one line naming the field."""
    cfg = check_fields(obj, PIXART_CONFIG, where)
    cfg = {k: cfg[k] for k in PIXART_CONFIG}
    if isinstance(obj, dict) and type(obj.get("interpolation_scale")) is int:  # keep the integer a config says
        cfg["interpolation_scale"] = obj["interpolation_scale"]
    hidden = check_width(cfg, where)
    c, out = cfg["in_channels"], cfg["out_channels"]
    if out not in (None, c, 2 * c):  # PixArt pipelines read the first half of a 2C output as the prediction
        raise DitqError(f"{where}: out_channels must be in_channels ({c}) or twice it (learned sigma), got {out}")
    if cfg["cross_attention_dim"] is None:
        raise DitqError(f"{where}: cross_attention_dim is null: a PixArt without cross-attention takes no text")
    if cfg["caption_channels"] is not None and cfg["cross_attention_dim"] != hidden:
        raise DitqError(f"{where}: cross_attention_dim {cfg['cross_attention_dim']} must equal num_attention_heads x "
                        f"attention_head_dim = {hidden}, the width caption_projection gives the captions")  # fmt: skip
    cfg["use_additional_conditions"] = uses_additional_conditions(cfg)
    if cfg["use_additional_conditions"] and hidden % 3:  # timestep + [2 resolution, 1 aspect-ratio] embeddings of hidden/3
        raise DitqError(f"{where}: use_additional_conditions needs num_attention_heads x attention_head_dim divisible by 3, got {hidden}")
    return cfg


@register
class PixArtSpec(FamilySpec):
    class_name = "PixArtTransformer2DModel"
    # every input a PixArt graph may have, in order; the last two only with additional conditions
    input_names = ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep", *ADDITIONAL_CONDITIONS)
    prediction_type = "epsilon"
    default_guidance = 4.5  # PixArtAlphaPipeline's and PixArtSigmaPipeline's guidance_scale
    # PixArtAlphaPipeline's: T5 run with the tokenizer's mask, its last hidden state (Sigma: text_encoders_for)
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "t5", ALPHA_TEXT_TOKENS, ("last_hidden_state",), attention_mask=True),)

    def check_config(self, obj: Any, where: str) -> dict[str, Any]:
        return check_pixart_config(obj, where)

    def graph_inputs(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        """The inputs of a graph of this ``config``: the micro-conditions only when the model uses them."""
        return self.input_names if uses_additional_conditions(config) else self.input_names[:4]

    def text_encoders_for(self, pipeline_class: Any) -> tuple[TextEncoderSpec, ...]:
        """The text encoder of the diffusers pipeline ``pipeline_class`` (``model_index.json``'s
        ``_class_name``; None: no pipeline folder): the T5 of :attr:`text_encoders` with that pipeline's
        ``max_sequence_length``; another class is refused in one line naming the known ones."""
        if pipeline_class is None:
            return self.text_encoders
        if not isinstance(pipeline_class, str) or pipeline_class not in PIPELINE_TEXT_TOKENS:
            raise DitqError(f"pipeline {shown(pipeline_class)} is not a PixArt pipeline ditq knows; "
                            f"it knows: {', '.join(PIPELINE_TEXT_TOKENS)}")  # fmt: skip
        return tuple(replace(e, max_length=PIPELINE_TEXT_TOKENS[pipeline_class]) for e in self.text_encoders)

    def text_encoder_variants(self) -> tuple[tuple[TextEncoderSpec, ...], ...]:
        """The T5 of each pipeline of :data:`PIPELINE_TEXT_TOKENS` (120 or 300 tokens)."""
        return tuple(dict.fromkeys(self.text_encoders_for(c) for c in PIPELINE_TEXT_TOKENS))

    def prompt_text(self, prompt: str) -> str:
        """The text the pipelines tokenize: the prompt lower-cased and stripped (``_text_preprocessing``)."""
        return prompt.lower().strip()

    def sample_shape(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        s = int(config["sample_size"])
        return int(config["in_channels"]), s, s

    def output_split(self, config: Mapping[str, Any]) -> tuple[int, int]:
        """Learned sigma when ``out_channels`` is twice ``in_channels`` (the first half is the prediction);
        otherwise the whole output is the prediction (as the PixArt pipelines read it)."""
        c = int(config["in_channels"])
        out = int(config["out_channels"] or c)
        return (c, c) if out == 2 * c else (out, 0)

    def feeds(self, config, x, t, cond, guidance=None) -> dict[str, np.ndarray]:
        """``x [B, C, H, W]`` latents, ``t`` the scheduler's integer timesteps (one, or one per row),
        ``cond``: :meth:`compose_prompt`'s text and mask; with micro-conditions, ``cond``'s ``resolution``
        ``[B, 2]`` and ``aspect_ratio`` ``[B, 1]`` where given, else the pipeline's values for latents of
        this size (:data:`VAE_SCALE_FACTOR` pixels per latent). ``guidance`` is not an input of PixArt."""
        x = np.ascontiguousarray(x, np.float32)
        if x.ndim != 4:
            raise DitqError(f"PixArt latents must be [B, C, H, W], got shape {shown(x.shape)}")
        b, _, h, w = x.shape
        feeds = {
            "hidden_states": x,
            "encoder_hidden_states": np.ascontiguousarray(cond["encoder_hidden_states"], np.float32),
            "encoder_attention_mask": np.ascontiguousarray(cond["encoder_attention_mask"], np.int64),
            "timestep": np.ascontiguousarray(np.broadcast_to(np.asarray(t, np.int64), (b,))),
        }
        if uses_additional_conditions(config):
            height, width = h * VAE_SCALE_FACTOR, w * VAE_SCALE_FACTOR
            resolution = cond.get("resolution", np.tile(np.array([[height, width]], np.float32), (b, 1)))
            aspect = cond.get("aspect_ratio", np.full((b, 1), np.float32(height / width)))
            feeds["resolution"] = np.ascontiguousarray(resolution, np.float32)
            feeds["aspect_ratio"] = np.ascontiguousarray(aspect, np.float32)
        return feeds

    def compose_prompt(self, encoded, masks, config=None) -> dict[str, np.ndarray]:
        """``encode_prompt`` of both PixArt pipelines: T5's last hidden state is the text, the tokenizer's
        attention mask (the one T5 was run with) masks its padding in every cross-attention."""
        return {
            "encoder_hidden_states": np.asarray(encoded["text_encoder"]["last_hidden_state"], np.float32),
            "encoder_attention_mask": np.asarray(masks["text_encoder"], np.int64),
        }
