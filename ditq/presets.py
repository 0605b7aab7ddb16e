"""Text-to-image presets: published transformer configs built with seeded random weights (no weights can be
downloaded here; speed, size and memory depend on the shapes only)."""

from __future__ import annotations

from typing import Any

from ditq.errors import DitqError
from ditq.families import spec_for

# Published text-to-image transformers by their configs (transformer/config.json of the diffusers
# repositories), built with seeded random weights: no weights can be downloaded here, and speed, size and
# memory depend on the shapes only. ``--image-size`` sets ``sample_size`` (latents are 1/8 of the image).
FAMILY_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # PixArt-alpha/PixArt-Sigma-XL-2-512-MS: 28 blocks of 1152 (16 heads of 72), T5-XXL captions (4096)
    "pixart-sigma": ("PixArtTransformer2DModel", dict(
        sample_size=64, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
        patch_size=2, caption_channels=4096, cross_attention_dim=1152, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False, interpolation_scale=None)),
    # stabilityai/stable-diffusion-3-medium-diffusers: 24 MMDiT blocks of 1536 (24 heads of 64), 16 latent channels
    "sd3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192)),
    # black-forest-labs/FLUX.1-dev at full width (blocks of 3072: 24 heads of 128, T5-XXL 4096, CLIP-L pooled 768,
    # guidance-distilled) with 1 of its 19 double-stream and 1 of its 38 single-stream blocks: the 12B model
    # does not fit this machine in float32; its blocks, embedders and output layer do (0.56B parameters)
    "flux-dev-2blocks": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}  # fmt: skip


def family_preset_config(name: str, image_size: int | None = None) -> dict[str, Any]:
    """The checked config of the text-to-image preset ``name`` at ``image_size`` (None: as published)."""
    class_name, config = FAMILY_PRESETS[name]
    config = dict(config)
    if image_size is not None:
        if "sample_size" not in config:
            raise DitqError(f"--image-size does not apply to {name}: its graph takes any image size (the bench uses the pipeline's default, 1024 px)")
        if image_size not in (256, 512, 1024):
            raise DitqError(f"--image-size must be 256, 512 or 1024 for {name}, got {image_size}")
        config["sample_size"] = image_size // 8
    return spec_for(class_name).check_config(config, f"preset {name}")
