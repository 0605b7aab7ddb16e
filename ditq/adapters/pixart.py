"""The PixArt family: diffusers' ``PixArtTransformer2DModel`` (PixArt-alpha and PixArt-Sigma); its signature,
micro-conditions and text encoder are in :mod:`ditq.families.pixart`.

Traced with the batch ``B`` and the text length ``T`` (``encoder_hidden_states`` and its mask) dynamic; the
image size is the config's ``sample_size``.

Coverage (Q-DiT), weights and input activations, by the input each group reads (one activation quantizer
per group): self-attention ``attn1.to_q/k/v`` (one group), ``attn1.to_out.0``; cross-attention
``attn2.to_q`` (the image tokens, its own group), ``attn2.to_k/to_v`` (the caption tokens: one group with its
own quantizer), ``attn2.to_out.0``; feed-forward ``ff.net.0.proj`` and ``ff.net.2``. Weight-only: the
shared timestep (and micro-condition) embedder and adaLN ``adaln_single`` (its ``linear`` is RobuQ's A4
layer, as DiT's per-block adaLN) and the caption projection ``caption_projection``. Float: the final
projection ``proj_out`` (as DiT keeps its own), the patch embedding (a convolution), the scale-shift tables.

Two changes make diffusers' forward exportable, both without changing a number (the wrapper's output is
diffusers' own forward's, bit for bit; tests/test_family_pixart.py):

- the cross-attention's mask: diffusers' ``AttnProcessor2_0`` repeats the ``[B, 1, T]`` bias per head and
  views it as ``[B, heads, 1, T]``, which ``torch.onnx.export`` cannot trace with a dynamic ``T``. While the
  wrapper runs, :class:`CrossAttnProcessor` replaces it on every ``attn2``: the same projections and the
  same ``scaled_dot_product_attention``, with the bias passed as ``[B, 1, 1, T]``, broadcast over heads
  and queries (the same values added to the same scores);
- ``hidden_states.squeeze(1)`` after ``proj_out``: a no-op in torch on the ``[B, N, D]`` tokens, but an
  ONNX ``Squeeze`` of a non-unit axis, which ONNX Runtime refuses to load. While the wrapper runs, a hook
  gives ``proj_out``'s output a unit axis 1 (``[B, 1, N, D]``), which that squeeze then removes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditq.adapters import Coverage, FamilyAdapter, InputGroup, build_seeded, register
from ditq.errors import DitqError
from ditq.families import spec_for
from ditq.families.pixart import PIPELINE_TEXT_TOKENS, VAE_SCALE_FACTOR, text_width, uses_additional_conditions

COVERAGE = Coverage(
    blocks="transformer_blocks",
    activation_groups=(
        InputGroup("attn1.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
        InputGroup("attn1.to_out.0", ("attn1.to_out.0",)),
        InputGroup("attn2.to_q", ("attn2.to_q",)),
        InputGroup("attn2.kv", ("attn2.to_k", "attn2.to_v"), "text"),
        InputGroup("attn2.to_out.0", ("attn2.to_out.0",)),
        InputGroup("ff.net.0.proj", ("ff.net.0.proj",)),
        InputGroup("ff.net.2", ("ff.net.2",)),
    ),
    float_linears=("proj_out",),
    robuq_activation_4bit=("adaln_single.linear",),
)
TRACE_TEXT = 7  # the example text tokens: unlike the batch, channels, latent size, patches and widths
MAX_TEXT = 1 << 16  # bound of the dynamic text length


class CrossAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for a cross-attention given a ``[B, 1, T]`` additive bias (PixArt's
    ``encoder_attention_mask``), which it passes to ``scaled_dot_product_attention`` as ``[B, 1, 1, T]``
    instead of repeating it per head: the same scores, traceable with a dynamic ``T``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if hidden_states.ndim != 3 or encoder_hidden_states is None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise DitqError("the PixArt export processor takes a cross-attention over [B, N, D] tokens")  # not PixArt's attn2
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attention_mask.unsqueeze(1)  # (B, 1, 1, T): broadcast over heads and queries
        query = attn.to_q(hidden_states)  # (B, N, H*d)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)  # (B, T, H*d)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, N, H*d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _unit_axis(module, args, output):
    """``proj_out``'s ``[B, N, D]`` as ``[B, 1, N, D]``: the ``squeeze(1)`` after it then removes a unit axis."""
    return output.unsqueeze(1)


@contextlib.contextmanager
def exportable(pixart: nn.Module) -> Iterator[None]:
    """While inside: :class:`CrossAttnProcessor` on every block's ``attn2`` and :func:`_unit_axis` on
    ``proj_out`` (see the module docstring); the model's own processors and hooks are back afterwards."""
    saved = [(block.attn2, block.attn2.processor) for block in pixart.transformer_blocks if block.attn2 is not None]
    hook = pixart.proj_out.register_forward_hook(_unit_axis)
    try:
        for attn, _ in saved:
            attn.processor = CrossAttnProcessor()
        yield
    finally:
        hook.remove()
        for attn, processor in saved:
            attn.processor = processor


class PixArtForward(nn.Module):
    """``(hidden_states, encoder_hidden_states, encoder_attention_mask, timestep) -> out`` with the diffusers
    PixArt inside (attribute ``pixart``), made exportable by :func:`exportable`."""

    def __init__(self, pixart: nn.Module):
        super().__init__()
        self.pixart = pixart

    def run(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, added_cond_kwargs=None):
        with exportable(self.pixart):
            return self.pixart(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                               added_cond_kwargs=added_cond_kwargs, encoder_attention_mask=encoder_attention_mask,
                               return_dict=False)[0]  # fmt: skip

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep) -> torch.Tensor:
        return self.run(hidden_states, encoder_hidden_states, encoder_attention_mask, timestep)


class PixArtConditionedForward(PixArtForward):
    """:class:`PixArtForward` of a model with micro-conditions: ``resolution [B, 2]``, ``aspect_ratio [B, 1]``."""

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, resolution, aspect_ratio) -> torch.Tensor:
        conds = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        return self.run(hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, conds)


def _forward_class(config: Mapping[str, Any]) -> type[PixArtForward]:
    return PixArtConditionedForward if uses_additional_conditions(config) else PixArtForward


@register
class PixArtAdapter(FamilyAdapter):
    """diffusers' ``PixArtTransformer2DModel``."""

    class_name = "PixArtTransformer2DModel"
    spec = spec_for(class_name)
    coverage = COVERAGE
    root = "pixart"  # PixArtForward's attribute: module paths in the traced graph start with "pixart."
    timestep_index = 3
    input_dtypes = ("float32", "float32", "int64", "int64", "float32", "float32")  # the mask and timestep: int64

    def wrap(self, model: nn.Module) -> nn.Module:
        return _forward_class(model.config)(model)

    def example_inputs(self, config: Mapping[str, Any], batch: int = 2, seed: int = 0, text_tokens: int = TRACE_TEXT) -> tuple[torch.Tensor, ...]:
        """Latents, ``text_tokens`` caption tokens (:data:`TRACE_TEXT`), masks that keep a prefix of 1 to
        ``T - 1`` tokens of each row (every row has padding, as a prompt shorter than the pipeline's length
        does), integer timesteps in 0..999; with micro-conditions, the pipeline's resolution and aspect
        ratio of a ``sample_size`` image."""
        g = torch.Generator().manual_seed(seed)
        c, s = config["in_channels"], config["sample_size"]
        x = torch.randn(batch, c, s, s, generator=g)
        text = torch.randn(batch, text_tokens, text_width(config), generator=g)
        kept = torch.randint(1, text_tokens, (batch, 1), generator=g)
        mask = (torch.arange(text_tokens)[None] < kept).to(torch.int64)  # (B, T): 1 for a token, 0 for padding
        t = torch.randint(0, 1000, (batch,), generator=g)
        inputs = (x, text, mask, t)
        if uses_additional_conditions(config):
            side = float(s * VAE_SCALE_FACTOR)
            inputs += (torch.tensor([[side, side]]).repeat(batch, 1), torch.ones(batch, 1))
        return inputs

    def serving_inputs(self, config: Mapping[str, Any], batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """:meth:`example_inputs` with the longest caption a PixArt pipeline passes (PixArt-Sigma's 300
        tokens, the prompt's padding masked)."""
        return self.example_inputs(config, batch=batch, seed=seed, text_tokens=max(PIPELINE_TEXT_TOKENS.values()))

    def dynamic_shapes(self, batch) -> tuple[dict[int, Any], ...]:
        """Batch on axis 0 of every input, the text tokens ``T`` on axis 1 of the text and its mask (the
        exporter takes as many entries as the traced inputs: the micro-conditions' only when present)."""
        t = torch.export.Dim("text_tokens", min=1, max=MAX_TEXT)
        return ({0: batch}, {0: batch, 1: t}, {0: batch, 1: t}, {0: batch}, {0: batch}, {0: batch})

    def build(self, config: Mapping[str, Any], seed: int | None = 0) -> nn.Module:
        from diffusers import PixArtTransformer2DModel

        return build_seeded(PixArtTransformer2DModel, config, seed)

    def timestep_input(self, timesteps: list[int]) -> torch.Tensor:
        """The integer timesteps themselves: PixArt's pipelines pass the scheduler's int64 timesteps."""
        return torch.tensor(timesteps, dtype=torch.int64)
