"""The Stable Diffusion 3 family, torch-free half: diffusers' ``SD3Transformer2DModel`` (MMDiT; SD3 and
SD3.5, whose ``dual_attention_layers`` and ``qk_norm`` it reads too).

Signature ``(hidden_states [B, C, H, W] float, encoder_hidden_states [B, T, D] float, pooled_projections
[B, P] float, timestep [B] float) -> out [B, C, H, W]``: the velocity of rectified flow. ``T`` (the text
tokens) is dynamic, ``H = W = sample_size`` static (the positional table is cropped to the traced size).
``timestep`` is what ``StableDiffusion3Pipeline`` passes: the flow-matching scheduler's ``sigma * 1000``.

The text inputs come from three encoders (:data:`SD3Spec.text_encoders`), combined by
:meth:`SD3Spec.compose_prompt` exactly as ``StableDiffusion3Pipeline.encode_prompt`` does (``clip_skip``
None)::

    clip   = concat(CLIP-L penultimate [B, 77, dL], CLIP-G penultimate [B, 77, dG], axis=-1)
    clip   = zero-pad(clip, to the T5 width D along the last axis)
    tokens = concat(clip [B, 77, D], T5 last_hidden_state [B, 256, D], axis=1)       # [B, 333, D]
    pooled = concat(CLIP-L text_embeds [B, pL], CLIP-G text_embeds [B, pG], axis=-1)  # [B, P]

A pipeline without T5 (``text_encoder_3`` None) feeds zeros ``[B, 256, joint_attention_dim]`` in its place.

ditq's own ``DitqDigitsPipeline`` (the shipped ``digits-t2i``, :mod:`ditq.calib.train_t2i`) has one small
CLIP with projection, trained with the transformer: ``tokens`` = its ``last_hidden_state [B, 16, D]``,
``pooled`` = its ``text_embeds [B, P]``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ditq.errors import DitqError, shown
from ditq.families import FamilySpec, TextEncoderSpec, register
from ditq.untrusted import Int, OneOf, check_fields, check_width

CLIP_OUTPUTS = ("last_hidden_state", "penultimate", "pooled")
CLIP_LENGTH = 77  # the CLIP tokenizers' model_max_length, the pipeline's tokenizer_max_length
T5_LENGTH = 256  # the pipeline's max_sequence_length default
DIGITS_PIPELINE = "DitqDigitsPipeline"  # ditq's digits-t2i: one CLIP with projection (module docstring)
DIGITS_LENGTH = 16  # its tokenizer's and encoder's length
QK_NORMS = (None, "rms_norm", "layer_norm", "fp32_layer_norm")  # what JointAttnProcessor2_0 applies per head

# The keyword arguments of diffusers' SD3Transformer2DModel with its defaults. Bounds far beyond any
# published model (SD3.5-large: 38 blocks of 2432, 38 heads of 64; T5-XXL width 4096; pooled 2048) that keep
# a hostile config from asking for an absurd model.
SD3_CONFIG: dict[str, Any] = {
    "sample_size": Int(1, 1024, 128),
    "patch_size": Int(1, 64, 2),
    "in_channels": Int(1, 1024, 16),
    "num_layers": Int(1, 512, 18),
    "attention_head_dim": Int(1, 1024, 64),
    "num_attention_heads": Int(1, 256, 18),
    "joint_attention_dim": Int(1, 65536, 4096),
    "caption_projection_dim": Int(1, 65536, 1152),
    "pooled_projection_dim": Int(1, 65536, 2048),
    "out_channels": Int(1, 1024, 16, nullable=True),
    "pos_embed_max_size": Int(1, 4096, 96, nullable=True),
    "dual_attention_layers": None,  # a list of block indices: checked by _block_indices
    "qk_norm": OneOf(QK_NORMS, None),
}
MAX_DUAL = 512  # dual_attention_layers entries (at most one per block)


def _block_indices(value: Any, num_layers: int, where: str) -> list[int]:
    """``dual_attention_layers``: a JSON array (a tuple when read from a model's config) of distinct block
    indices ``0..num_layers-1``; empty (SD3, SD3.5-large) or some blocks (SD3.5-medium: 0..12)."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_DUAL:
        raise DitqError(f"{where}: dual_attention_layers must be an array of block indices, got {shown(value, kinds=True)}")
    item = Int(0, num_layers - 1)
    out = [item.check(v, f"dual_attention_layers[{i}]", where) for i, v in enumerate(value)]
    if len(set(out)) != len(out):
        raise DitqError(f"{where}: dual_attention_layers names a block twice: {shown(list(value))}")
    return out


@register
class SD3Spec(FamilySpec):
    class_name = "SD3Transformer2DModel"
    input_names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
    prediction_type = "flow"
    default_guidance = 7.0  # StableDiffusion3Pipeline's guidance_scale
    flow_grids = {"StableDiffusion3Pipeline": "timesteps", DIGITS_PIPELINE: "timesteps"}  # the scheduler's own spacing (no sigmas passed)
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", "clip-projection", CLIP_LENGTH, CLIP_OUTPUTS),  # CLIP-L
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "clip-projection", CLIP_LENGTH, CLIP_OUTPUTS),  # CLIP-G
        TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", T5_LENGTH, ("last_hidden_state",), optional=True),  # T5-XXL
    )

    digits_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "clip-projection", DIGITS_LENGTH, CLIP_OUTPUTS),)

    def text_encoders_for(self, pipeline_class: Any) -> tuple[TextEncoderSpec, ...]:
        """:data:`DIGITS_PIPELINE`'s single CLIP, else StableDiffusion3Pipeline's three encoders."""
        return self.digits_encoders if pipeline_class == DIGITS_PIPELINE else self.text_encoders

    def text_encoder_variants(self) -> tuple[tuple[TextEncoderSpec, ...], ...]:
        return (self.text_encoders, self.text_encoders[:2], self.digits_encoders)  # with T5, without (zeros), digits

    def check_config(self, obj: Any, where: str) -> dict[str, Any]:
        """The constructor keywords of ``obj`` (other keys dropped), each field bounded, and consistent:
        ``caption_projection_dim`` is the blocks' width (the text stream joins the image stream's
        attention), the output is the latents' velocity (``out_channels`` = ``in_channels``), the latent
        patches fit the positional table."""
        schema = {k: v for k, v in SD3_CONFIG.items() if v is not None}
        cfg = check_fields(obj, schema, where)
        cfg = {k: cfg.get(k) for k in SD3_CONFIG}
        cfg["dual_attention_layers"] = _block_indices(obj.get("dual_attention_layers", []), cfg["num_layers"], where)
        hidden = check_width(cfg, where)
        if cfg["caption_projection_dim"] != hidden:
            raise DitqError(f"{where}: caption_projection_dim {cfg['caption_projection_dim']} must equal num_attention_heads "
                            f"x attention_head_dim = {hidden} (the text tokens join the image tokens' attention)")  # fmt: skip
        if cfg["out_channels"] not in (None, cfg["in_channels"]):
            raise DitqError(f"{where}: out_channels {cfg['out_channels']} must equal in_channels {cfg['in_channels']} "
                            "(the output is the velocity of the latents)")  # fmt: skip
        s, p, most = cfg["sample_size"], cfg["patch_size"], cfg["pos_embed_max_size"]
        if most is not None and s // p > most:
            raise DitqError(f"{where}: sample_size {s} / patch_size {p} = {s // p} patches a side, more than pos_embed_max_size {most}")
        return cfg

    def sample_shape(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        s = int(config["sample_size"])
        return int(config["in_channels"]), s, s

    def output_split(self, config: Mapping[str, Any]) -> tuple[int, int]:
        return int(config.get("out_channels") or config["in_channels"]), 0

    def feeds(self, config, x, t, cond, guidance=None) -> dict[str, np.ndarray]:
        """``t``: the scheduler's timesteps (``sigma * 1000``, float), one per row; ``cond``:
        :meth:`compose_prompt`'s arrays, one row per sample."""
        return {
            "hidden_states": np.ascontiguousarray(x, np.float32),
            "encoder_hidden_states": np.ascontiguousarray(cond["encoder_hidden_states"], np.float32),
            "pooled_projections": np.ascontiguousarray(cond["pooled_projections"], np.float32),
            "timestep": np.ascontiguousarray(t, np.float32),
        }

    def compose_prompt(self, encoded: Mapping[str, Mapping[str, np.ndarray]], masks: Mapping[str, np.ndarray],
                       config: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """``encoder_hidden_states [B, 77 + 256, D]`` and ``pooled_projections [B, pL + pG]`` from the
        encoders' outputs (module docstring); the masks are not used (SD3 attends over every token). Without
        a T5 (no ``text_encoder_3`` in ``encoded``) its tokens are zeros of width ``config``'s
        ``joint_attention_dim``, as the pipeline's are. :data:`DIGITS_PIPELINE`'s one encoder (no
        ``text_encoder_2``): its last hidden states and projection as they are."""
        if "text_encoder_2" not in encoded:
            only = encoded["text_encoder"]
            return {"encoder_hidden_states": np.asarray(only["last_hidden_state"], np.float32),
                    "pooled_projections": np.asarray(only["pooled"], np.float32)}  # fmt: skip
        clip_l, clip_g = encoded["text_encoder"], encoded["text_encoder_2"]
        clip = np.concatenate([clip_l["penultimate"], clip_g["penultimate"]], axis=-1).astype(np.float32)
        if "text_encoder_3" in encoded:
            t5 = np.asarray(encoded["text_encoder_3"]["last_hidden_state"], np.float32)
        elif config is None:
            raise DitqError("SD3 without a T5 encoder (text_encoder_3): the transformer's config gives the width of its zero tokens")
        else:
            t5 = np.zeros((clip.shape[0], T5_LENGTH, int(config["joint_attention_dim"])), np.float32)
        width = t5.shape[-1]  # a negative pad cuts, as torch.nn.functional.pad does (no SD3 is built so)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, max(width - clip.shape[-1], 0))))[..., :width]
        pooled = np.concatenate([clip_l["pooled"], clip_g["pooled"]], axis=-1).astype(np.float32)
        return {"encoder_hidden_states": np.concatenate([clip, t5], axis=1), "pooled_projections": pooled}

