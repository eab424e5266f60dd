"""Uniform cross-attention maps (UAM; Mo et al., WACV 2025, arXiv 2411.19652, sec. 3.3.1).

For the UNet batch rows whose branch is "uniform" in the call's context (adapters/context.py), every
cross-attention (`attn2`) layer replaces softmax(QKᵀ/√d) by the uniform matrix 1/L (L context tokens:
BOS, EOS and padding alike, every head). Each query then receives the mean of the L value vectors, so
the layer output is the constant

    o = to_out(to_v(mean_j c_j))        broadcast to every query position,

exact because the uniform weights sum to one and `to_v` is affine (mean_j to_v(c_j) = to_v(mean_j c_j)).
No Q/K work is needed, and projecting one averaged token costs 1/L of the value projection, which is
why the constant is recomputed per call instead of being cached (a cache would go stale whenever the
context changes). The other rows go through the processor that was installed before, untouched.

Usage::

    with attach_uniform_attention(unet), call_context(unet, CallContext.of_branches(["uniform", "cond"])):
        eps = unet(latents, t, encoder_hidden_states=context).sample  # row 0 uniform, row 1 normal

Which rows are uniform is explicit data in the context, never inferred from the batch size; outside
any call context every row is. `detach()` takes the processors out in any order relative to other
processor swaps (adapters/processors.py), so outputs are bit-identical once everything is detached.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .context import Attachments, attachments
from .processors import ProcessorSwap, WrappingProcessor, attention_layers


class UniformCrossAttnProcessor(WrappingProcessor):
    """attn2 processor: the context's "uniform" rows get uniform attention maps, the rest `base_processor`.

    `state` is the registry of the UNet it sits in (its current context says which rows are uniform);
    without one, or outside a call context, every row is uniform."""

    def __init__(self, base_processor, state: Attachments | None = None):
        super().__init__(base_processor)
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("UniformCrossAttnProcessor is for cross-attention: encoder_hidden_states is required")
        batch = hidden_states.shape[0]
        # A CPU mask: the decisions below and the row indexing (CPU indices are allowed for any device)
        # never wait for the accelerator.
        rows = self._rows(batch)
        if not rows.any():  # pure pass-through: bit-identical to the base processor
            return self.base_processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=attention_mask, **kwargs)

        uniform = uniform_attention_output(attn, hidden_states[rows], encoder_hidden_states[rows])
        if rows.all():
            return uniform
        keep = ~rows
        normal = self.base_processor(
            attn, hidden_states[keep], encoder_hidden_states=encoder_hidden_states[keep],
            attention_mask=attention_mask[keep] if attention_mask is not None else None, **kwargs,
        )
        out = uniform.new_empty((batch, *uniform.shape[1:]))
        out[rows] = uniform
        out[keep] = normal.to(out.dtype)
        return out

    def _rows(self, batch: int) -> torch.Tensor:
        context = self.state.context if self.state is not None else None
        if context is None:
            return torch.ones(batch, dtype=torch.bool)
        rows = context.row_mask("uniform")
        if rows.numel() != batch:
            raise ValueError(
                f"the call context has {rows.numel()} rows but the attention batch has {batch} rows; the pipeline "
                "must describe every UNet batch row (adapters/context.py)"
            )
        return rows


def uniform_attention_output(attn: Attention, hidden_states: torch.Tensor,
                             encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """o = to_out(to_v(mean_j c_j)) at every query position (UAM, arXiv 2411.19652, sec. 3.3.1), with the
    standard path's norm_cross, dropout, residual and rescale semantics (cf. diffusers' `AttnProcessor2_0`).

    hidden_states: (B, N, C) or (B, C, H, W) queries (only their shape and the residual are used);
    encoder_hidden_states: (B, L, D) context. Returns the shape of `hidden_states`.
    """
    residual = hidden_states
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        num_queries = height * width
    else:
        batch, num_queries, _ = hidden_states.shape

    context = encoder_hidden_states
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    # Mean in fp32 (L up to 77 terms), then back to the projection's dtype.
    mean = context.float().mean(dim=1, keepdim=True).to(context.dtype)  # (B, 1, D)
    out = attn.to_out[0](attn.to_v(mean))  # (B, 1, C_out): identical for every head and query
    out = attn.to_out[1](out.expand(batch, num_queries, -1))  # dropout per position, as the standard path

    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def attach_uniform_attention(unet: nn.Module) -> ProcessorSwap:
    """Wrap every attn2 processor of `unet` in a `UniformCrossAttnProcessor`; the call context chooses the rows.
    The returned swap detaches (also as a context manager) in any order relative to other swaps."""
    layers = attention_layers(unet, "cross")
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no attn2 cross-attention layers to make uniform")
    for name, layer in layers.items():
        processor = layer.processor
        while isinstance(processor, WrappingProcessor):
            if isinstance(processor, UniformCrossAttnProcessor):
                raise RuntimeError(f"uniform attention is already attached ({name}); detach the first swap first")
            processor = processor.base_processor
    state = attachments(unet)
    return ProcessorSwap(layers, lambda path, previous: UniformCrossAttnProcessor(previous, state))
