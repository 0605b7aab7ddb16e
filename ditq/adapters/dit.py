"""The DiT family: diffusers' ``DiTTransformer2DModel`` (facebookresearch/DiT's architecture).

Signature ``(sample [B, C, H, W] float, timestep [B] int64, class_labels [B] int64) -> out [B, C', H, W]``
with ``C' = C`` (the prediction) or ``2C`` (and the learned-sigma variance values). Class labels are
``0..num_classes-1``; ``num_classes`` is the null class classifier-free guidance pairs with every label.

Coverage (Q-DiT and RobuQ): ``to_q``, ``to_k``, ``to_v`` (one input: one group), the attention output
``to_out.0``, fc1 ``ff.net.0.proj`` and fc2 ``ff.net.2`` of every block get weights and activations; adaLN
``norm1.linear`` is RobuQ's A4 layer; the class tables and the final modulation ``proj_out_1`` are RobuQ's
4-bit weight-only layers; the final projection ``proj_out_2`` stays float (both papers keep it float).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from ditq.adapters import Coverage, FamilyAdapter, InputGroup, build_seeded, register
from ditq.families import spec_for

COVERAGE = Coverage(
    blocks="transformer_blocks",
    activation_groups=(
        InputGroup("attn1.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
        InputGroup("attn1.to_out.0", ("attn1.to_out.0",)),
        InputGroup("ff.net.0.proj", ("ff.net.0.proj",)),
        InputGroup("ff.net.2", ("ff.net.2",)),
    ),
    float_linears=("proj_out_2",),
    robuq_activation_4bit=("transformer_blocks.*.norm1.linear",),
    robuq_weight_4bit=("*class_embedder.embedding_table", "proj_out_1"),
)


class DiTForward(nn.Module):
    """``(sample, timestep, class_labels) -> model output`` with the diffusers DiT inside (attribute ``dit``)."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.dit(sample, timestep=timestep, class_labels=class_labels, return_dict=False)[0]


class TorchDiT:
    """A PyTorch DiT (float or quantized reference) as a sampler callable over numpy arrays, like
    :class:`ditq.runtime.session.OrtDiT`, so one sampling loop drives both."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.model(
                torch.from_numpy(np.ascontiguousarray(sample, np.float32)),
                timestep=torch.from_numpy(np.asarray(timestep, np.int64)),
                class_labels=torch.from_numpy(np.asarray(class_labels, np.int64)),
                return_dict=False,
            )[0]
        return out.numpy()


@register
class DiTAdapter(FamilyAdapter):
    """diffusers' ``DiTTransformer2DModel``."""

    class_name = "DiTTransformer2DModel"
    spec = spec_for(class_name)
    coverage = COVERAGE
    root = "dit"  # DiTForward's attribute: module paths in the traced graph start with "dit."

    def wrap(self, model: nn.Module) -> nn.Module:
        return DiTForward(model)

    def example_inputs(self, config: Mapping[str, Any], batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Latents, integer timesteps in 0..999, class labels (the null class included)."""
        g = torch.Generator().manual_seed(seed)
        c, s = config["in_channels"], config["sample_size"]
        num_classes = config["num_embeds_ada_norm"]
        x = torch.randn(batch, c, s, s, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        y = torch.randint(0, num_classes + 1, (batch,), generator=g)  # num_classes = the CFG null class
        return x, t, y

    def torch_callable(self, model: nn.Module) -> TorchDiT:
        return TorchDiT(model)

    def build(self, config: Mapping[str, Any], seed: int | None = 0) -> nn.Module:
        from diffusers import DiTTransformer2DModel

        return build_seeded(DiTTransformer2DModel, config, seed)

    def timestep_input(self, timesteps: list[int]) -> torch.Tensor:
        return torch.tensor(timesteps, dtype=torch.int64)
