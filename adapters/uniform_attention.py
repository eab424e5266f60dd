"""Uniform cross-attention maps (UAM; Mo et al., WACV 2025, arXiv 2411.19652, see papers/uam.md §2).

For the batch rows selected by a boolean row mask, every cross-attention (`attn2`) layer replaces
softmax(QKᵀ/√d) by the uniform matrix 1/L (L context tokens: BOS, EOS and padding alike, every head).
Each query then receives the mean of the L value vectors, so the layer output is the constant

    o = to_out(to_v(mean_j c_j))        broadcast to every query position,

exact because the uniform weights sum to one and `to_v` is affine (mean_j to_v(c_j) = to_v(mean_j c_j)).
No Q/K work is needed, and projecting one averaged token costs 1/L of the value projection, which is
why the constant is recomputed per call instead of being cached (a cache would go stale whenever the
context changes). The other rows go through the processor that was installed before, untouched.

Usage::

    with attach_uniform_attention(unet, row_mask=torch.tensor([True, False])) as handle:
        eps = unet(latents, t, encoder_hidden_states=context).sample  # row 0 uniform, row 1 normal
        handle.row_mask = None                                        # every row uniform

The mask is explicit data (never inferred from the batch size), set on the handle or passed per call as
`cross_attention_kwargs={"uniform_row_mask": mask}` (self-attention processors then log that they ignore
it). `detach()` puts back the exact processor objects that were there, so outputs are bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

RowMask = torch.Tensor | Sequence[bool]


class UniformCrossAttnProcessor:
    """attn2 processor: rows in `row_mask` get uniform attention maps, the rest use `base_processor`.

    A plain callable (not an `nn.Module`) because it holds no weights: attaching it leaves the UNet's
    state dict unchanged. `row_mask` None means every row is uniform.
    """

    def __init__(self, base_processor, row_mask: RowMask | None = None):
        self.base_processor = base_processor
        self.row_mask = row_mask

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        uniform_row_mask: RowMask | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("UniformCrossAttnProcessor is for cross-attention: encoder_hidden_states is required")
        batch = hidden_states.shape[0]
        # A CPU mask: the decisions below and the row indexing (CPU indices are allowed for any device)
        # never wait for the accelerator.
        rows = self._rows(uniform_row_mask if uniform_row_mask is not None else self.row_mask, batch)
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

    @staticmethod
    def _rows(row_mask: RowMask | None, batch: int) -> torch.Tensor:
        if row_mask is None:
            return torch.ones(batch, dtype=torch.bool)
        rows = torch.as_tensor(row_mask, dtype=torch.bool).flatten().cpu()
        if rows.numel() != batch:
            raise ValueError(
                f"uniform row mask has {rows.numel()} entries but the attention batch has {batch} rows; "
                "pass one boolean per UNet batch row (True = uniform attention)"
            )
        return rows


def uniform_attention_output(attn: Attention, hidden_states: torch.Tensor,
                             encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """o = to_out(to_v(mean_j c_j)) at every query position (UAM §2), with the standard path's
    norm_cross, dropout, residual and rescale semantics (cf. diffusers' `AttnProcessor2_0`).

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


def cross_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """The `attn2` cross-attention modules of a diffusers UNet (SD 1.x/2.x: 16, SDXL: 70), by module path."""
    return {
        name: module for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2" and module.is_cross_attention
    }


class UniformAttentionHandle:
    """What `attach_uniform_attention` installed: set `row_mask` per call, `detach()` to restore.

    Also a context manager that detaches on exit.
    """

    def __init__(self, layers: dict[str, Attention], row_mask: RowMask | None):
        self._layers = layers
        self._previous = {name: layer.processor for name, layer in layers.items()}
        self._processors = {name: UniformCrossAttnProcessor(prev, row_mask) for name, prev in self._previous.items()}
        self._row_mask = row_mask
        for name, layer in layers.items():
            layer.set_processor(self._processors[name])

    @property
    def row_mask(self) -> RowMask | None:
        return self._row_mask

    @row_mask.setter
    def row_mask(self, row_mask: RowMask | None) -> None:
        self._row_mask = row_mask
        for processor in self._processors.values():
            processor.row_mask = row_mask

    @property
    def attached(self) -> bool:
        return bool(self._processors)

    def detach(self) -> None:
        """Put back the exact processor objects that were there before (a no-op when already detached)."""
        for name, layer in self._layers.items():
            if layer.processor is not self._processors[name]:
                raise RuntimeError(
                    f"the processor of {name} was replaced after uniform attention was attached; "
                    "detach whatever was attached later first (reverse order)"
                )
        for name, layer in self._layers.items():
            layer.set_processor(self._previous[name])
        self._processors = {}
        self._layers = {}

    def __enter__(self) -> UniformAttentionHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()


def attach_uniform_attention(unet: nn.Module, row_mask: RowMask | None = None) -> UniformAttentionHandle:
    """Wrap every attn2 processor of `unet` in a `UniformCrossAttnProcessor` sharing one row mask.

    row_mask: one bool per UNet batch row (True = uniform attention); None = every row uniform.
    """
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no attn2 cross-attention layers to make uniform")
    attached = [name for name, layer in layers.items() if isinstance(layer.processor, UniformCrossAttnProcessor)]
    if attached:
        raise RuntimeError(f"uniform attention is already attached ({attached[0]}); detach the first handle first")
    return UniformAttentionHandle(layers, row_mask)
