"""The DiT family, torch-free half: diffusers' ``DiTTransformer2DModel`` (facebookresearch/DiT).

Signature ``(sample [B, C, H, W] float, timestep [B] int64, class_labels [B] int64) -> out [B, C', H, W]``
with ``C' = C`` (the prediction) or ``2C`` (and the learned-sigma variance values). Class labels are
``0..num_classes-1``; ``num_classes`` is the null class classifier-free guidance pairs with every label.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ditq.families import FamilySpec, register
from ditq.pipeline import ClassConditioning
from ditq.untrusted import check_dit_config


@register
class DiTSpec(FamilySpec):
    class_name = "DiTTransformer2DModel"
    input_names = ("sample", "timestep", "class_labels")

    def check_config(self, obj: Any, where: str) -> dict[str, Any]:
        return check_dit_config(obj, where)

    def sample_shape(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        s = int(config["sample_size"])
        return int(config["in_channels"]), s, s

    def output_split(self, config: Mapping[str, Any]) -> tuple[int, int]:
        """Learned sigma when ``out_channels`` is twice ``in_channels`` (the first half is the prediction);
        otherwise the whole output is the prediction (as diffusers' ``DiTPipeline`` reads it)."""
        c = int(config["in_channels"])
        out = int(config["out_channels"] or c)
        return (c, c) if out == 2 * c else (out, 0)

    def conditioning(self, config: Mapping[str, Any]) -> ClassConditioning:
        n = int(config["num_embeds_ada_norm"])
        return ClassConditioning(n, null_label=n)

    def feeds(self, config, x, t, cond, guidance=None) -> dict[str, np.ndarray]:
        return {
            "sample": np.ascontiguousarray(x, np.float32),
            "timestep": np.ascontiguousarray(t, np.int64),
            "class_labels": np.ascontiguousarray(cond["class_labels"], np.int64),
        }
