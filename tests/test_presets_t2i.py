"""The text-to-image presets have the published models' shapes: built on the meta device (no memory), their
parameter counts are the published sizes (PixArt-Sigma "0.6B", SD3-medium "2B" transformers), and
``--image-size`` sets the latent size."""

from __future__ import annotations

import pytest
import torch

from ditq.adapters import adapter_for
from ditq.errors import DitqError
from ditq.presets import FAMILY_PRESETS, family_preset_config


@pytest.mark.parametrize("name, billions", [("pixart-sigma", 0.6), ("sd3-medium", 2.0)])
def test_presets_have_the_published_sizes(name, billions):
    import diffusers

    class_name = FAMILY_PRESETS[name][0]
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**family_preset_config(name))
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 1) == billions
    assert adapter_for(model).class_name == class_name


def test_image_size_sets_the_latent_size_and_is_checked():
    assert family_preset_config("sd3-medium", 512)["sample_size"] == 64
    assert family_preset_config("pixart-sigma", 1024)["sample_size"] == 128
    with pytest.raises(DitqError, match="--image-size must be 256, 512 or 1024"):
        family_preset_config("sd3-medium", 300)


def test_the_flux_preset_is_flux_dev_with_one_block_of_each_kind():
    """Its blocks are FLUX.1-dev's: with the published 19 double-stream and 38 single-stream blocks the same
    config is the "12B" transformer; the preset keeps one of each (0.55B)."""
    import diffusers

    class_name, config = FAMILY_PRESETS["flux-dev-2blocks"]
    assert (config["num_layers"], config["num_single_layers"]) == (1, 1)
    with torch.device("meta"):
        full = getattr(diffusers, class_name)(**{**family_preset_config("flux-dev-2blocks"), "num_layers": 19, "num_single_layers": 38})
        two = getattr(diffusers, class_name)(**family_preset_config("flux-dev-2blocks"))
    assert round(sum(p.numel() for p in full.parameters()) / 1e9) == 12
    assert round(sum(p.numel() for p in two.parameters()) / 1e9, 2) == 0.55
    with pytest.raises(DitqError, match="--image-size does not apply to flux-dev-2blocks"):
        family_preset_config("flux-dev-2blocks", 512)


@pytest.mark.parametrize("name, image_tokens, text_tokens", [("flux-dev-2blocks", 4096, 512), ("pixart-sigma", 1024, 300), ("sd3-medium", 4096, 333)])
def test_the_bench_feeds_the_sizes_the_pipelines_run_at(name, image_tokens, text_tokens):
    """FluxPipeline's default 1024 px (128x128 latents, packed 2x2) and T5's 512 tokens; PixArt-Sigma's 300
    caption tokens at 512 px; SD3's 77 + 256 text tokens at 1024 px."""
    class_name, _ = FAMILY_PRESETS[name]
    config = family_preset_config(name)
    inputs = adapter_for(class_name).serving_inputs(config, batch=1, seed=0)
    x, text = inputs[0], inputs[1]
    tokens = x.shape[1] if x.dim() == 3 else (x.shape[2] // config["patch_size"]) * (x.shape[3] // config["patch_size"])
    assert (x.shape[0], tokens, text.shape[:2]) == (1, image_tokens, (1, text_tokens))
