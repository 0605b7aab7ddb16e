"""The Stable Diffusion 3 family: diffusers' ``SD3Transformer2DModel`` (MMDiT: SD3, SD3.5).

Signature (see :mod:`ditq.families.sd3`): ``(hidden_states [B, C, H, W], encoder_hidden_states [B, T, D],
pooled_projections [B, P], timestep [B] float) -> out [B, C, H, W]``, the velocity. Batch ``B`` and text
length ``T`` are dynamic; the image size is the config's ``sample_size`` (traced: the positional table is
cropped to it at trace time).

Coverage. Every block runs one joint attention over the image and the text tokens, each stream with its
own projections; Q-DiT's layers are those of both streams:

- weights + input activations: the image stream's ``attn.to_q``/``to_k``/``to_v`` (one input: one group,
  one shared activation quantizer), the text stream's ``attn.add_q_proj``/``add_k_proj``/``add_v_proj``
  (one group), ``attn.to_out.0``, ``attn.to_add_out``, ``ff.net.0.proj``, ``ff.net.2``,
  ``ff_context.net.0.proj``, ``ff_context.net.2``; SD3.5's dual-attention blocks also ``attn2.to_q``/
  ``to_k``/``to_v`` (one group) and ``attn2.to_out.0``. The last block has no text output
  (``context_pre_only``: no ``to_add_out``, no ``ff_context``): its groups are those it holds;
- weight-only: ``context_embedder``, the ``time_text_embed`` linears (timestep and pooled-text MLPs), the
  adaLN ``norm1.linear`` and ``norm1_context.linear`` of every block (RobuQ's A4 layers, as DiT's), and the
  final modulation ``norm_out.linear`` (weight-only as DiT's ``proj_out_1``; RobuQ's 4-bit weight-only);
- float: the final projection ``proj_out`` (as DiT's ``proj_out_2``: both papers keep it float), the patch
  embedding ``pos_embed.proj`` (a convolution) and its positional table, the layer norms and SD3.5's
  per-head q/k norms (``qk_norm``), the attention products.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from ditq.adapters import Coverage, FamilyAdapter, InputGroup, build_seeded, register
from ditq.families import spec_for

# The input groups of an MMDiT joint block (SD3's JointTransformerBlock; Flux's double-stream blocks are the
# same design under the same module names): each stream's q/k/v, its output projection and feed-forward.
JOINT_GROUPS = (
    InputGroup("attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    InputGroup("attn.add_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "text"),
    InputGroup("attn.to_out.0", ("attn.to_out.0",)),
    InputGroup("attn.to_add_out", ("attn.to_add_out",), "text"),
    InputGroup("ff.net.0.proj", ("ff.net.0.proj",)),
    InputGroup("ff.net.2", ("ff.net.2",)),
    InputGroup("ff_context.net.0.proj", ("ff_context.net.0.proj",), "text"),
    InputGroup("ff_context.net.2", ("ff_context.net.2",), "text"),
)
COVERAGE = Coverage(
    blocks="transformer_blocks",
    activation_groups=(
        *JOINT_GROUPS,
        InputGroup("attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
        InputGroup("attn2.to_out.0", ("attn2.to_out.0",)),
    ),
    float_linears=("proj_out",),
    robuq_activation_4bit=("transformer_blocks.*.norm1.linear", "transformer_blocks.*.norm1_context.linear"),
    robuq_weight_4bit=("norm_out.linear",),
)
TEXT_TOKENS = 77 + 256  # what StableDiffusion3Pipeline feeds: CLIP's 77 tokens, then T5's 256
MAX_TEXT = 8192  # the traced range of the text length


class SD3Forward(nn.Module):
    """``(hidden_states, encoder_hidden_states, pooled_projections, timestep) -> velocity`` with the diffusers
    model inside (attribute ``transformer``)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> torch.Tensor:
        return self.transformer(hidden_states, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                timestep=timestep, return_dict=False)[0]  # fmt: skip


def text_length(config: Mapping[str, Any], batch: int) -> int:
    """The traced text length: the pipeline's 333 tokens, moved past any size the other inputs have (the
    tracer would tie a dynamic axis to an equal size: unify it with the batch, or specialize it)."""
    taken = {batch, int(config["in_channels"]), int(config["sample_size"]), int(config["joint_attention_dim"]),
             int(config["pooled_projection_dim"])}  # fmt: skip
    t = TEXT_TOKENS
    while t in taken:
        t += 1
    return t


@register
class SD3Adapter(FamilyAdapter):
    """diffusers' ``SD3Transformer2DModel``."""

    class_name = "SD3Transformer2DModel"
    spec = spec_for(class_name)
    coverage = COVERAGE
    root = "transformer"  # SD3Forward's attribute: module paths in the traced graph start with "transformer."
    timestep_index = 3

    def wrap(self, model: nn.Module) -> nn.Module:
        return SD3Forward(model)

    def example_inputs(self, config: Mapping[str, Any], batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Latents, text tokens of :func:`text_length`, pooled text, timesteps ``sigma * 1000`` in [0, 1000)."""
        g = torch.Generator().manual_seed(seed)
        c, s = int(config["in_channels"]), int(config["sample_size"])
        x = torch.randn(batch, c, s, s, generator=g)
        text = torch.randn(batch, text_length(config, batch), int(config["joint_attention_dim"]), generator=g)
        pooled = torch.randn(batch, int(config["pooled_projection_dim"]), generator=g)
        t = torch.rand(batch, generator=g) * 1000
        return x, text, pooled, t

    def dynamic_shapes(self, batch) -> tuple[dict[int, Any], ...]:
        """Batch on every input, the text length on ``encoder_hidden_states``."""
        text = torch.export.Dim("text", min=1, max=MAX_TEXT)
        return {0: batch}, {0: batch, 1: text}, {0: batch}, {0: batch}

    def build(self, config: Mapping[str, Any], seed: int | None = 0) -> nn.Module:
        from diffusers import SD3Transformer2DModel

        return build_seeded(SD3Transformer2DModel, config, seed)

    def timestep_input(self, timesteps: list[int]) -> torch.Tensor:
        """The pipeline's timestep at DDPM step ``t`` of 0..999: the flow-matching ``sigma * 1000`` = ``t``, as float."""
        return torch.tensor(timesteps, dtype=torch.float32)
