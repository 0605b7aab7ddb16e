"""The Flux family: diffusers' ``FluxTransformer2DModel`` (Flux.1 dev and schnell); its signature and
packing are in :mod:`ditq.families.flux`.

Traced with the batch ``B``, the text length ``T`` (``encoder_hidden_states`` and ``txt_ids``) and the image
tokens ``S`` (``hidden_states`` and ``img_ids``) dynamic: one graph serves every prompt length and image size.

Coverage (Q-DiT), weights and input activations, by the input each group reads (one activation quantizer
per group):

- double-stream blocks ``transformer_blocks`` (MMDiT, as SD3): ``attn.to_q/k/v`` (image tokens),
  ``attn.add_q_proj/add_k_proj/add_v_proj`` (text tokens), ``attn.to_out.0``, ``attn.to_add_out``,
  ``ff.net.0.proj``, ``ff.net.2``, ``ff_context.net.0.proj``, ``ff_context.net.2``;
- single-stream blocks ``single_transformer_blocks``: ``attn.to_q/k/v`` and ``proj_mlp`` read the same
  modulated tokens (one group); ``proj_out`` reads ``[attention, MLP]`` concatenated (its own).

Weight-only: ``x_embedder``, ``context_embedder``, ``time_text_embed`` (timestep, guidance and pooled-text
MLPs), the adaLN linears ``norm1.linear``/``norm1_context.linear``/``norm.linear`` (RobuQ's A4 layers) and
the final modulation ``norm_out.linear`` (RobuQ's 4-bit weight-only layer). Float: the final projection
``proj_out`` (as DiT keeps its own), the rotary embeddings, the qk-RMSNorms and every other norm (none of
them is a linear).

Memory plan for Flux.1 at full size (11.9B parameters: 47.6 GB in float32, twice this 24 GB machine),
not implemented:

1. Build on the meta device (``torch.device("meta")``): no parameter memory; read the safetensors shards
   tensor by tensor (memory-mapped) instead of as one state dict.
2. Quantize block by block: materialise one block's float weights (a double block is 340M parameters,
   1.36 GB; a single block 142M, 0.57 GB), compute its codes and scales, write them out and release the
   block before the next one (W4 codes are 1/8 of the float bytes: about 6 GB in all, on disk).
3. Export the same way: trace one double and one single block at full width (every block of a list has
   the same graph up to its weights), rewrite each with the quantization passes, and stitch the 57 block
   graphs, the embedders and the final layer into one model whose initializers go to external data as
   they are produced; peak memory is then about one float block and its graph, not the model.
4. Validate the same way: the float and the quantized references run block by block on the same
   inputs, each block's weights read from the shards when its turn comes.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from ditq.adapters import BlockList, Coverage, FamilyAdapter, InputGroup, build_seeded, register
from ditq.adapters.sd3 import JOINT_GROUPS
from ditq.families import spec_for
from ditq.families.flux import image_ids, text_ids

COVERAGE = Coverage(
    blocks="transformer_blocks",
    activation_groups=JOINT_GROUPS,  # the MMDiT joint block's, as SD3's
    more_blocks=(
        BlockList(
            "single_transformer_blocks",
            (
                InputGroup("qkv_mlp", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "joint"),
                InputGroup("proj_out", ("proj_out",), "joint"),
            ),
        ),
    ),
    float_linears=("proj_out",),  # the whole name: the final projection, not the single blocks' proj_out
    robuq_activation_4bit=(
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "single_transformer_blocks.*.norm.linear",
    ),
    robuq_weight_4bit=("norm_out.linear",),
)
TRACE_LATENT = (6, 10)  # the example latents' H, W: 15 image tokens, unlike any other traced size
TRACE_TEXT = 7  # the example text tokens
MAX_TOKENS = 1 << 20  # bounds of the dynamic text length and image tokens


class FluxForward(nn.Module):
    """``(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids) -> out``
    with the diffusers Flux inside (attribute ``flux``)."""

    def __init__(self, flux: nn.Module):
        super().__init__()
        self.flux = flux

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids) -> torch.Tensor:
        return self.flux(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, return_dict=False)[0]


class FluxGuidedForward(FluxForward):
    """:class:`FluxForward` of a guidance-distilled model: the guidance scale ``[B]`` as a last input."""

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance) -> torch.Tensor:
        return self.flux(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                         return_dict=False)[0]  # fmt: skip


@register
class FluxAdapter(FamilyAdapter):
    """diffusers' ``FluxTransformer2DModel``."""

    class_name = "FluxTransformer2DModel"
    spec = spec_for(class_name)
    coverage = COVERAGE
    root = "flux"  # FluxForward's attribute: module paths in the traced graph start with "flux."
    timestep_index = 3
    block_counts = (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers"))

    def wrap(self, model: nn.Module) -> nn.Module:
        return (FluxGuidedForward if model.config.guidance_embeds else FluxForward)(model)

    def example_inputs(self, config: Mapping[str, Any], batch: int = 2, seed: int = 0, latent: tuple[int, int] = TRACE_LATENT,
                       text_tokens: int = TRACE_TEXT) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Packed latents of ``latent`` (:data:`TRACE_LATENT`), ``text_tokens`` (:data:`TRACE_TEXT`) text
        tokens, sigmas in [0, 1), the pipeline's ids and (guidance-distilled models) guidance scales in [1, 5)."""
        g = torch.Generator().manual_seed(seed)
        h2, w2 = latent[0] // 2, latent[1] // 2
        inputs = (
            torch.randn(batch, h2 * w2, config["in_channels"], generator=g),
            torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g),
            torch.randn(batch, config["pooled_projection_dim"], generator=g),
            torch.rand(batch, generator=g),
            torch.from_numpy(image_ids(h2, w2)),
            torch.from_numpy(text_ids(text_tokens)),
        )
        if config["guidance_embeds"]:
            inputs += (1 + 4 * torch.rand(batch, generator=g),)
        return inputs

    def serving_inputs(self, config: Mapping[str, Any], batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """:meth:`example_inputs` at FluxPipeline's defaults: the latents of :meth:`~FluxSpec.sample_shape`
        (1024 px: 4096 image tokens) and T5's 512 text tokens."""
        _, h, w = self.spec.sample_shape(config)
        return self.example_inputs(config, batch=batch, seed=seed, latent=(h, w), text_tokens=self.spec.text_encoders[-1].max_length)

    def dynamic_shapes(self, batch) -> tuple[dict[int, Any], ...]:
        """Batch on axis 0 of the per-row inputs; the image tokens ``S`` and text tokens ``T`` on the
        token axis of the hidden states and on axis 0 of their ids (the ids have no batch axis)."""
        s = torch.export.Dim("image_tokens", min=1, max=MAX_TOKENS)
        t = torch.export.Dim("text_tokens", min=1, max=MAX_TOKENS)
        return ({0: batch, 1: s}, {0: batch, 1: t}, {0: batch}, {0: batch}, {0: s}, {0: t}, {0: batch})

    def build(self, config: Mapping[str, Any], seed: int | None = 0) -> nn.Module:
        from diffusers import FluxTransformer2DModel

        return build_seeded(FluxTransformer2DModel, config, seed)

    def timestep_input(self, timesteps: list[int]) -> torch.Tensor:
        """``t / 1000`` in float32: the sigma FluxPipeline passes at scheduler timestep ``t``."""
        return torch.tensor(timesteps, dtype=torch.float32) / 1000
