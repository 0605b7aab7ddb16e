"""The Flux family, torch-free half: diffusers' ``FluxTransformer2DModel`` (Flux.1 dev and schnell).

Signature (the graph's inputs, in order; ``B`` batch, ``T`` text tokens, ``S`` image tokens, all three
dynamic)::

    hidden_states          [B, S, 4C] float   latents [B, C, H, W] packed in 2x2 patches, S = (H/2)(W/2)
    encoder_hidden_states  [B, T, D]  float   T5's last hidden state (D = joint_attention_dim)
    pooled_projections     [B, P]     float   CLIP-L's pooled output (P = pooled_projection_dim)
    timestep               [B]        float   sigma = t / 1000 (the model multiplies it by 1000 again)
    img_ids                [S, 3]     float   (0, row, column) of every packed patch
    txt_ids                [T, 3]     float   zeros
    guidance               [B]        float   the guidance scale; only when ``guidance_embeds`` (dev)
    -> out                 [B, S, 4C] float   the velocity, packed as ``hidden_states``

``in_channels`` counts the packed channels: Flux.1's 64 are 16 latent channels in 2x2 patches, which
:meth:`FluxSpec.feeds` packs and :meth:`FluxSpec.prediction` unpacks exactly as ``FluxPipeline``'s
``_pack_latents``/``_unpack_latents`` and ``_prepare_latent_image_ids`` do. A graph of a model without
``guidance_embeds`` (schnell) has the first six inputs only.

Image size: the config has no ``sample_size``; :meth:`FluxSpec.sample_shape` is ``FluxPipeline``'s default,
1024 px (``default_sample_size`` 128 latents, the VAE's factor 8). The graph's image tokens are dynamic, so
any latent size with even sides runs: the rotary position ids carry the size, nothing in the weights does.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ditq.errors import DitqError, shown
from ditq.families import FamilySpec, TextEncoderSpec, register
from ditq.untrusted import Bool, Int, ListOf, check_fields, check_width

# The keyword arguments of FluxTransformer2DModel with its defaults (Flux.1: 19 double and 38 single blocks of
# 24 heads of 128, T5-XXL 4096, CLIP-L 768). The bounds are far beyond Flux.1 and keep a hostile config from
# asking for an absurd model; what a bound cannot say is checked in :func:`check_flux_config`.
FLUX_CONFIG: dict[str, Any] = {
    "patch_size": Int(1, 64, 1),
    "in_channels": Int(4, 4096, 64),
    "out_channels": Int(4, 4096, None, nullable=True),
    "num_layers": Int(1, 256, 19),
    "num_single_layers": Int(1, 256, 38),
    "attention_head_dim": Int(2, 1024, 128),
    "num_attention_heads": Int(1, 256, 24),
    "joint_attention_dim": Int(1, 65536, 4096),
    "pooled_projection_dim": Int(1, 65536, 768),
    "guidance_embeds": Bool(False),
    "axes_dims_rope": ListOf(Int(2, 1024), 3, [16, 56, 56]),
}
DEFAULT_LATENT = 128  # FluxPipeline.default_sample_size: latents of a 1024 px image (VAE factor 8)
ID_AXES = 3  # the position ids' columns: (0, row, column) for image tokens, zeros for text tokens


def check_flux_config(obj: Any, where: str) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` keyword arguments of a config object (other keys dropped), every field
    checked against :data:`FLUX_CONFIG`, and what ditq cannot export or sample refused naming the field."""
    if isinstance(obj, dict) and isinstance(obj.get("axes_dims_rope"), tuple):  # a model's own config holds a tuple
        obj = {**obj, "axes_dims_rope": list(obj["axes_dims_rope"])}
    cfg = check_fields(obj, FLUX_CONFIG, where)
    cfg = {k: cfg[k] for k in FLUX_CONFIG}
    if cfg["patch_size"] != 1:  # FluxPipeline packs 2x2 latent patches itself; the model's proj_out would not fit them
        raise DitqError(f"{where}: patch_size must be 1 (FluxPipeline packs the latents in 2x2 patches itself), got {cfg['patch_size']}")
    if cfg["in_channels"] % 4:
        raise DitqError(f"{where}: in_channels {cfg['in_channels']} is not a multiple of 4 (latent channels in 2x2 patches)")
    if cfg["out_channels"] not in (None, cfg["in_channels"]):  # Fill/Depth-style models: extra input channels
        raise DitqError(f"{where}: out_channels {cfg['out_channels']} differs from in_channels {cfg['in_channels']}; "
                        "only text-to-image Flux models (out_channels = in_channels) are supported")  # fmt: skip
    check_width(cfg, where, grid=False)
    axes = cfg["axes_dims_rope"]
    if len(axes) != ID_AXES:
        raise DitqError(f"{where}: axes_dims_rope must have {ID_AXES} entries (one per position id column), got {shown(axes)}")
    if any(a % 2 for a in axes):  # each axis rotates pairs of channels
        raise DitqError(f"{where}: axes_dims_rope entries must be even, got {shown(axes)}")
    if sum(axes) != cfg["attention_head_dim"]:
        raise DitqError(f"{where}: axes_dims_rope {shown(axes)} must sum to attention_head_dim {cfg['attention_head_dim']}")
    return cfg


def pack_latents(x: np.ndarray) -> np.ndarray:
    """``[B, C, H, W] -> [B, (H/2)(W/2), 4C]``: 2x2 patches, channel-major inside a patch (``_pack_latents``)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(out: np.ndarray, h: int, w: int) -> np.ndarray:
    """``[B, (H/2)(W/2), 4C] -> [B, C, H, W]``, the inverse of :func:`pack_latents` (``_unpack_latents``)."""
    b, _, packed = out.shape
    return out.reshape(b, h // 2, w // 2, packed // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, packed // 4, h, w)


def image_ids(h2: int, w2: int) -> np.ndarray:
    """``[h2 * w2, 3]`` float32 ids ``(0, row, column)`` of the packed patches, row-major
    (``_prepare_latent_image_ids`` at ``h2 = H/2``, ``w2 = W/2``)."""
    ids = np.zeros((h2, w2, ID_AXES), np.float32)
    ids[..., 1] = np.arange(h2, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w2, dtype=np.float32)[None, :]
    return ids.reshape(h2 * w2, ID_AXES)


def text_ids(t: int) -> np.ndarray:
    """``[t, 3]`` float32 zeros: text tokens all sit at position 0 (``encode_prompt``'s ``text_ids``)."""
    return np.zeros((t, ID_AXES), np.float32)


@register
class FluxSpec(FamilySpec):
    class_name = "FluxTransformer2DModel"
    # every input a Flux graph may have, in order; "guidance" only when the config's guidance_embeds
    input_names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance")
    prediction_type = "flow"
    # FluxPipeline's guidance_scale is the guidance input of a guidance-distilled model and does nothing
    # otherwise (schnell); its negative prompt works only with true_cfg_scale, which ditq does not offer
    negative_prompt_guidance = False
    default_guidance = 3.5  # FluxPipeline's guidance_scale
    flow_grids = {"FluxPipeline": "sigmas"}  # FluxPipeline passes sigmas = linspace(1, 1 / steps, steps)
    # FluxPipeline: CLIP-L's pooled output (77 tokens) and T5's hidden states (max_sequence_length 512)
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", "clip", 77, ("last_hidden_state", "penultimate", "pooled")),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "t5", 512, ("last_hidden_state",)),
    )

    def check_config(self, obj: Any, where: str) -> dict[str, Any]:
        return check_flux_config(obj, where)

    def sample_shape(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        """Latents ``(in_channels / 4, 128, 128)``: a 1024 px image, FluxPipeline's default (the graph takes
        any even latent size)."""
        return int(config["in_channels"]) // 4, DEFAULT_LATENT, DEFAULT_LATENT

    def image_tokens(self, config: Mapping[str, Any]) -> int:
        """Packed 2x2 patches at :meth:`sample_shape` (what FluxPipeline's resolution-dependent shift reads)."""
        _, h, w = self.sample_shape(config)
        return (h // 2) * (w // 2)

    def output_split(self, config: Mapping[str, Any]) -> tuple[int, int]:
        """The unpacked prediction's latent channels; no learned variance."""
        return int(config["in_channels"]) // 4, 0

    def feeds(self, config, x, t, cond, guidance=None) -> dict[str, np.ndarray]:
        """``x [B, C, H, W]`` latents packed, ``t`` the scheduler's timesteps (sigma x 1000) divided by 1000
        in float32 as FluxPipeline does, the ids of this image size and text length, and ``guidance`` (the
        guidance scale, required by guidance-distilled models, ignored by others as FluxPipeline does)."""
        x = np.asarray(x, np.float32)
        if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise DitqError(f"Flux latents must be [B, C, H, W] with even H and W, got shape {shown(x.shape)}")
        b, _, h, w = x.shape
        text = np.ascontiguousarray(cond["encoder_hidden_states"], np.float32)
        feeds = {
            "hidden_states": np.ascontiguousarray(pack_latents(x)),
            "encoder_hidden_states": text,
            "pooled_projections": np.ascontiguousarray(cond["pooled_projections"], np.float32),
            "timestep": np.broadcast_to(np.asarray(t, np.float32), (b,)) / np.float32(1000),
            "img_ids": image_ids(h // 2, w // 2),
            "txt_ids": text_ids(text.shape[1]),
        }
        if config["guidance_embeds"]:
            if guidance is None:
                raise DitqError("this Flux model is guidance-distilled (guidance_embeds): give a guidance scale")
            feeds["guidance"] = np.full(b, guidance, np.float32)
        return feeds

    def prediction(self, config: Mapping[str, Any], out: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The packed output ``[B, S, 4C]`` unpacked to ``[B, C, H, W]`` at the size of ``x``."""
        return unpack_latents(np.asarray(out), x.shape[2], x.shape[3])

    def compose_prompt(self, encoded, masks, config=None) -> dict[str, np.ndarray]:
        """FluxPipeline.encode_prompt: T5's last hidden state is the text, CLIP-L's pooled output the pooled
        projection; neither takes an attention mask."""
        return {
            "encoder_hidden_states": np.asarray(encoded["text_encoder_2"]["last_hidden_state"], np.float32),
            "pooled_projections": np.asarray(encoded["text_encoder"]["pooled"], np.float32),
        }
