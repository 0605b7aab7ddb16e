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
