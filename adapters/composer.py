"""LoRA-Composer (Yang et al., arXiv 2403.11627): several concepts in one image, training-free, on one UNet.

The call context's regions (adapters/context.py) say where each concept goes: a box, the region prompt's
embeddings per batch row, and the concept adapter whose weight deltas act inside the box. Two parts are
attention processors installed here, two are steps of the pipeline's loop (pipelines/compose.py):

(a) region-aware injection (sec. 3.2), every attn2 layer: the global output comes from the base weights on
    the global prompt; inside box n it is replaced by the concept's own attention,
        softmax(Q_base K_nᵀ) V_n  through  (W_out + ΔW_out^n),   K_n = (W_K + ΔW_K^n) e_n,  V_n likewise,
    where e_n is the region prompt. K_n and V_n are computed at each pass, as the base computes the global prompt's:
    kept for the call, they would hold a copy per region, layer and batch (full and conditional) beside the one a
    gradient pass keeps for its backward.
(b) concept isolation (sec. 3.3), every attn1 layer: a query in box n cannot attend to a key in another box
    (-1e6 on those logits); queries outside every box attend anywhere.
(c) loss-guided latent updates (sec. 3.4): `composer_loss` over the maps `Composer.recording()` collects at the
    lowest cross-attention resolution (SD 1.5: 16x16 at 512 px, down_blocks.2 and up_blocks.1; SDXL: 32x32 at
    1024 px, down_blocks.2 and up_blocks.0; mid excluded).
(d) latent re-initialisation (sec. 3.5): `reinitialise_latents`.

Memory stays one UNet: a concept contributes only its attn2 k/v/out deltas, each computed when its module runs
(`delta_term`; the reference holds one pipeline per concept plus one). Two options go beyond the paper, for
concepts whose identity is spread over the whole UNet (a UNet-only LoRA, unlike the paper's ED-LoRAs):
`RegionalDeltas` lets a concept's other deltas act in its box too, and `box_cells`' "touched" rule gives a box
every cell it touches at each resolution.
The loss weights follow the reference code (8, 2, 10), which reproduce the paper's 0.25
for the fill term but not its 0.8 for the region term (docs/methods.md, LoRA-Composer).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Adapter
from .context import Attachments, CallContext, Region, attachments
from .processors import ProcessorSwap, WrappingProcessor, attention_layers

ISOLATION_LOGIT = -1e6  # sec. 3.3: the logits of a query in one box towards a key in another


@dataclass(frozen=True)
class ComposerLossWeights:
    """The terms of the latent update's loss (sec. 3.4), as in the reference code."""

    concept: float = 8.0  # L_ce: the concept's tokens attend strongly inside its box
    fill: float = 2.0  # L_fill: the token map spans the box's rows and columns
    region: float = 10.0  # L_region: self-attention from a box does not leak out of it
    top_k_ratio: float = 0.2  # k = floor(ratio * cells of the box) for the top-k means

    def __post_init__(self) -> None:
        for name in ("concept", "fill", "region"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"ComposerLossWeights.{name}={value!r} must be a finite number >= 0")
        if not (isinstance(self.top_k_ratio, (int, float)) and 0 < self.top_k_ratio <= 1):
            raise ValueError(f"ComposerLossWeights.top_k_ratio={self.top_k_ratio!r} must be in (0, 1]")


# -- geometry ------------------------------------------------------------------------------------------------


def map_size(unet: nn.Module, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the lowest-resolution down block with attention: where the composer's maps are read
    (SD 1.x/2.x: latent / 4; SDXL, whose first down block has none: latent / 4 too; the Shapes model: latent / 2)."""
    factor, found = 1, None
    for block in unet.down_blocks:
        if getattr(block, "attentions", None):
            found = factor
        if getattr(block, "downsamplers", None):
            factor *= 2
    if found is None:
        raise ValueError("this UNet has no down block with attention: LoRA-Composer reads cross-attention maps")
    return latent_size[0] // found, latent_size[1] // found


def grid_of(num_queries: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention layer's query grid from its length and the image's (width, height)."""
    width, height = image_size
    h = round(math.sqrt(num_queries * height / width))
    if h * (num_queries // h) != num_queries:
        raise ValueError(f"{num_queries} queries do not form a grid of the image's aspect {width}x{height}")
    return h, num_queries // h


CELL_RULES = ("inside", "touched")


def check_cell_rule(cells: str) -> None:
    if cells not in CELL_RULES:
        raise ValueError(f"cells={cells!r} must be one of {CELL_RULES}")


def box_cells(box: tuple[float, float, float, float], h: int, w: int,
              cells: str = "inside") -> tuple[int, int, int, int]:
    """(top, left, bottom, right) grid cells of a fractional box, at least one: "inside", the cells wholly
    inside it (the reference's ceil/floor); "touched", every cell it touches (floor/ceil), which at a coarse
    grid can be much larger than "inside" (a 24 px box on a 4x4 grid of 64 px holds 1 cell, touches 2)."""
    check_cell_rule(cells)
    x0, y0, x1, y1 = box
    lower, upper = (math.ceil, math.floor) if cells == "inside" else (math.floor, math.ceil)
    eps = 1e-6 if cells == "inside" else -1e-6  # a box edge on a grid line counts as that line
    top, left = min(lower(y0 * h - eps), h - 1), min(lower(x0 * w - eps), w - 1)
    bottom, right = max(upper(y1 * h + eps), top + 1), max(upper(x1 * w + eps), left + 1)
    return top, left, bottom, right


def box_mask(box: tuple[float, float, float, float], h: int, w: int, cells: str = "inside") -> torch.Tensor:
    """(h, w) bool: the box's cells by `box_cells`' rule."""
    top, left, bottom, right = box_cells(box, h, w, cells)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def isolation_bias(regions: Sequence[Region], h: int, w: int, dtype: torch.dtype,
                   cells: str = "inside") -> torch.Tensor:
    """(N, N) additive logits: ISOLATION_LOGIT where the query is in box n and the key in a box m != n (a cell
    two boxes touch belongs to the later one)."""
    owner = torch.full((h * w,), -1)  # the region of each cell, -1 outside every box
    for i, region in enumerate(regions):
        owner[box_mask(region.box, h, w, cells).flatten()] = i
    blocked = (owner[:, None] >= 0) & (owner[None, :] >= 0) & (owner[:, None] != owner[None, :])
    logit = max(ISOLATION_LOGIT, torch.finfo(dtype).min)  # -1e6 overflows fp16
    return torch.zeros(h * w, h * w, dtype=dtype).masked_fill(blocked, logit)


# -- attention ----------------------------------------------------------------------------------------------


def attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           bias: torch.Tensor | None = None, want_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of projected (B, n, inner) queries on (B, L, inner) keys/values, as diffusers'
    AttnProcessor2_0 does between its projections; returns (B, n, inner) and, if asked, the probabilities
    averaged over heads (B, n, L)."""
    batch, heads = query.shape[0], attn.heads
    q, k, v = (x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if want_probs:
        logits = q @ k.transpose(-1, -2) * attn.scale  # (B, heads, n, L)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        out, mean_probs = probs @ v, probs.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        mean_probs = None
    return out.transpose(1, 2).reshape(batch, -1, heads * v.shape[-1]).to(query.dtype), mean_probs


class AttentionMaps:
    """What one recorded UNet pass left at the map resolution: per region, its tokens' cross-attention
    maps (B, N, T) from each layer; and the self-attention maps (B, N, N), averaged over heads."""

    def __init__(self, num_regions: int):
        self.cross: list[list[torch.Tensor]] = [[] for _ in range(num_regions)]
        self.self_attention: list[torch.Tensor] = []

    def region_maps(self, i: int, h: int, w: int) -> torch.Tensor | None:
        """(B, T, h, w): region i's token maps averaged over layers; None without tokens or records."""
        if not self.cross[i] or self.cross[i][0].shape[-1] == 0:
            return None
        maps = torch.stack(self.cross[i]).mean(dim=0)  # (B, N, T)
        return maps.transpose(1, 2).reshape(maps.shape[0], -1, h, w)


class _ComposerState:
    """Shared by the processors of one `Composer`: the UNet's context, what is being recorded, and the
    caches (which injected weights each concept changes, the isolation logits, each box's cells)."""

    def __init__(self, registry: Attachments, size: tuple[int, int], isolation: bool, cells: str,
                 injected_names: Sequence[str]):
        check_cell_rule(cells)  # refused now, not mid-call
        self.registry, self.map_size, self.isolation, self.cells = registry, size, isolation, cells
        self.injected_names = tuple(injected_names)  # every attn2 k/v/out weight of the UNet
        self.recording: AttentionMaps | None = None
        self._injected: dict[int, frozenset[str]] = {}
        self._bias: dict[tuple, torch.Tensor] = {}
        self._cells: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def context(self) -> CallContext | None:
        """The current call's context when it has regions (else the processors pass through)."""
        ctx = self.registry.context
        if ctx is None or not ctx.regions:
            return None
        if ctx.image_size is None:
            raise ValueError("a call context with regions needs image_size (width, height) to place the boxes")
        return ctx

    def injected(self, adapter: Adapter) -> frozenset[str]:
        """The attn2 k/v/out weights `adapter` changes, found once per composer (one delta at a time)."""
        if id(adapter) not in self._injected:
            self._injected[id(adapter)] = changed_weights(adapter, self.injected_names)
        return self._injected[id(adapter)]

    def region_key_value(self, path: str, attn: Attention, i: int, region: Region,
                         ctx: CallContext) -> tuple[torch.Tensor, torch.Tensor]:
        if region.text_embeds is None:
            raise ValueError(f"CallContext.regions[{i}] has no text_embeds: the pipeline must embed its prompt")
        changed = self.injected(region.adapter) if region.adapter is not None else frozenset()
        with torch.no_grad():
            e = region.text_embeds.to(attn.to_k.weight.device, attn.to_k.weight.dtype)
            if attn.norm_cross:
                e = attn.norm_encoder_hidden_states(e)
            return tuple(module(e) + (delta_term(module, e, region.adapter, f"{path}.{name}.weight", ctx)
                                      if f"{path}.{name}.weight" in changed else 0.0)
                         for name, module in (("to_k", attn.to_k), ("to_v", attn.to_v)))

    def box_cells_on(self, box: tuple[float, float, float, float], h: int, w: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A box's (h, w) bool mask and its flat cell indices at one resolution, on `device`: built once, as the
        processors and hooks ask on every UNet pass (finding the indices on a GPU waits for it)."""
        key = (box, h, w, device)
        if key not in self._cells:
            mask = box_mask(box, h, w, self.cells).to(device)
            self._cells[key] = mask, mask.flatten().nonzero().squeeze(1)
        return self._cells[key]

    def bias(self, ctx: CallContext, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The isolation logits of the call's boxes at one resolution: one (h w)² tensor however many contexts (a
        call's full batch and its conditional rows) share the boxes (SD 1.5's 64x64 level: 32 MiB in fp16)."""
        key = (tuple(region.box for region in ctx.regions), h, w, dtype, device)
        if key not in self._bias:
            self._bias[key] = isolation_bias(ctx.regions, h, w, dtype, self.cells).to(device)
        return self._bias[key]


def delta_term(module: nn.Module, x: torch.Tensor, adapter: Adapter, name: str, ctx: CallContext) -> torch.Tensor:
    """What `adapter` adds to `module`'s output for input x: x ΔWᵀ (a convolution: conv(x, ΔW)), zero on the rows
    the call keeps adapters off. ΔW (`Adapter.delta_weight`, one module of one concept) is computed here and
    dropped; in a gradient pass (the latent update) it is recomputed for the backward rather than kept by autograd.
    Held, a concept's dense deltas would cost the size of the layers it adapts (SD 1.5's attention and feed-forward
    weights: 0.9 GiB in fp32), per concept."""
    def term_of(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            delta = adapter.delta_weight(name).to(x.device, x.dtype)
        if x.ndim == 4:  # (B, C, H, W)
            return F.conv2d(x, delta, None, module.stride, module.padding, module.dilation, module.groups)
        return F.linear(x, delta)  # (B, N, C)

    term = checkpoint(term_of, x, use_reentrant=False) if x.requires_grad else term_of(x)
    scales = ctx.adapter_row_scales()
    if scales is None:
        return term
    return term * scales.to(term.device, term.dtype).view(-1, *(1,) * (term.ndim - 1))


class RegionalCrossAttention(WrappingProcessor):
    """attn2: each region's box gets the concept's own attention on its region prompt (sec. 3.2)."""

    def __init__(self, base_processor, state: _ComposerState, path: str):
        super().__init__(base_processor)
        self.state, self.path = state, path
        self.records = not path.startswith("mid_block")  # the reference reads down and up blocks only

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        out = self.base_processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                  attention_mask=attention_mask, **kwargs)
        ctx = self.state.context()
        if ctx is None:
            return out
        if hidden_states.ndim != 3:
            raise ValueError(f"{self.path}: regional attention expects (B, N, C) hidden states")
        h, w = grid_of(hidden_states.shape[1], ctx.image_size)
        maps = self.state.recording if self.records and (h, w) == self.state.map_size else None
        query = attn.to_q(hidden_states)  # the base W_Q: the image's own queries
        out = out.clone()
        for i, region in enumerate(ctx.regions):
            cells = self.state.box_cells_on(region.box, h, w, out.device)[1]
            key, value = self.state.region_key_value(self.path, attn, i, region, ctx)
            if maps is None:
                o, _ = attend(attn, query[:, cells], key, value)
            else:
                # The region prompt's maps over the whole image, as the reference records them: re-initialisation
                # looks for where the concept arises anywhere (maps zero outside the box would always pick the box).
                o, probs = attend(attn, query, key, value, want_probs=True)
                maps.cross[i].append(probs[..., list(region.token_indices)])
                o = o[:, cells]
            out_name = f"{self.path}.to_out.0.weight"
            if region.adapter is not None and out_name in self.state.injected(region.adapter):
                o = attn.to_out[0](o) + delta_term(attn.to_out[0], o, region.adapter, out_name, ctx)
            else:
                o = attn.to_out[0](o)
            o = attn.to_out[1](o)
            if attn.residual_connection:
                o = o + hidden_states[:, cells]
            out[:, cells] = (o / attn.rescale_output_factor).to(out.dtype)
        return out


class RegionIsolation(WrappingProcessor):
    """attn1: a query in one box does not attend to keys in another box (sec. 3.3); records the maps."""

    def __init__(self, base_processor, state: _ComposerState, path: str):
        super().__init__(base_processor)
        self.state, self.path = state, path
        self.records = not path.startswith("mid_block")

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        ctx = self.state.context()
        if ctx is None or encoder_hidden_states is not None or hidden_states.ndim != 3:
            return self.base_processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=attention_mask, **kwargs)
        batch, n, _ = hidden_states.shape
        h, w = grid_of(n, ctx.image_size)
        bias = self.state.bias(ctx, h, w, hidden_states.dtype, hidden_states.device) if self.state.isolation else None
        maps = self.state.recording if self.records and (h, w) == self.state.map_size else None
        if maps is None:
            if bias is None:
                return self.base_processor(attn, hidden_states, attention_mask=attention_mask, **kwargs)
            mask = bias.expand(batch, n, n)
            if attention_mask is not None:
                mask = mask + attention_mask
            return self.base_processor(attn, hidden_states, attention_mask=mask, **kwargs)
        if attn.group_norm is not None or attention_mask is not None:
            raise ValueError(f"{self.path}: recording self-attention maps supports plain self-attention only")
        o, probs = attend(attn, attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states),
                          bias, want_probs=True)
        maps.self_attention.append(probs)
        o = attn.to_out[1](attn.to_out[0](o))
        if attn.residual_connection:
            o = o + hidden_states
        return o / attn.rescale_output_factor


INJECTED = ("to_k", "to_v", "to_out.0")  # the attn2 modules whose concept deltas act by sec. 3.2's injection


def changed_weights(adapter: Adapter, names: Iterable[str]) -> frozenset[str]:
    """Those of the weight `names` that `adapter` changes (each delta computed once, one at a time)."""
    with torch.no_grad():
        return frozenset(name for name in names if adapter.delta_weight(name) is not None)


def other_weights(unet: nn.Module) -> list[str]:
    """The UNet's linear and convolution weights outside the injection (attn2 k/v/out)."""
    skip = {f"{path}.{name}" for path in attention_layers(unet, "cross") for name in INJECTED}
    return [f"{path}.weight" for path, module in unet.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and path not in skip]


class RegionalDeltas:
    """Each concept's deltas outside the injection (self-attention, cross-attention's queries, feed-forward,
    convolutions) acting only inside its box: a forward hook per adapted module adds x ΔWᵀ (a convolution: conv(x,
    ΔW)) at the box's positions, on the rows the call's adapters act on (`delta_term`). Not in the paper, whose
    ED-LoRA concepts carry their identity in cross-attention; a UNet-only LoRA's identity is spread over all its
    layers (docs/methods.md, LoRA-Composer). Removing the hooks restores the UNet exactly."""

    def __init__(self, unet: nn.Module, state: _ComposerState, adapters: Sequence[Adapter]):
        self.state = state
        candidates = other_weights(unet)
        self.adapted = {id(adapter): changed_weights(adapter, candidates) for adapter in adapters}
        paths = sorted({name.removesuffix(".weight") for names in self.adapted.values() for name in names})
        modules = dict(unet.named_modules())
        self._handles = [modules[path].register_forward_hook(self._hook(path)) for path in paths]

    def _hook(self, path: str):
        def add_deltas(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            ctx = self.state.context()
            if ctx is None:
                return output
            for region in ctx.regions:
                name = f"{path}.weight"
                if region.adapter is None or name not in self.adapted.get(id(region.adapter), ()):
                    continue
                # detach(): the latent update's gradient treats these deltas as constants. As often right as through
                # them at step 20, twice as often at step 40 (docs/benchmarks.md, fusion, session 24), and the
                # backward would keep each module's input per concept.
                term = delta_term(module, args[0].detach(), region.adapter, name, ctx)
                grid = term.shape[-2:] if term.ndim == 4 else grid_of(term.shape[1], ctx.image_size)
                mask = self.state.box_cells_on(region.box, *grid, term.device)[0]
                mask = mask[None, None] if term.ndim == 4 else mask.flatten()[None, :, None]
                output = output + term * mask
            return output
        return add_deltas

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Composer:
    """The composer's processors on every attn1/attn2 layer of `unet`; they act only in calls whose context
    has regions. `size`: the map resolution (`map_size`); `every_delta`: the concepts whose other deltas act in their
    boxes besides the injected ones (`RegionalDeltas`); `cells`: which grid cells a box covers at each
    resolution (`box_cells`). Detaching (also on leaving a `with`) restores the UNet exactly."""

    def __init__(self, unet: nn.Module, size: tuple[int, int], *, isolation: bool = True,
                 every_delta: Sequence[Adapter] = (), cells: str = "inside"):
        cross, self_layers = attention_layers(unet, "cross"), attention_layers(unet, "self")
        injected_names = [f"{path}.{name}.weight" for path in cross for name in INJECTED]
        self.state = _ComposerState(attachments(unet), size, isolation, cells, injected_names)

        def make(path: str, previous) -> WrappingProcessor:
            kind = RegionalCrossAttention if path in cross else RegionIsolation
            return kind(previous, self.state, path)

        self.swap = ProcessorSwap({**cross, **self_layers}, make)
        self.regional_deltas = RegionalDeltas(unet, self.state, every_delta)

    @contextmanager
    def recording(self, num_regions: int) -> Iterator[AttentionMaps]:
        """Within the block, the UNet's passes record their maps (with gradients, if enabled) into the yield."""
        self.state.recording = AttentionMaps(num_regions)
        try:
            yield self.state.recording
        finally:
            self.state.recording = None

    def detach(self) -> None:
        self.swap.detach()
        self.regional_deltas.remove()

    def __enter__(self) -> Composer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()


# -- the latent update's loss, and the re-initialisation ------------------------------------------------------


def smooth(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """3x3 Gaussian smoothing of (B, T, h, w) maps, reflect-padded (sec. 3.4)."""
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=maps.dtype, device=maps.device)
    g = torch.exp(-x.square() / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(maps.shape[1], 1, 3, 3)
    padded = F.pad(maps, (1, 1, 1, 1), mode="reflect") if min(maps.shape[-2:]) > 1 else F.pad(maps, (1,) * 4)
    return F.conv2d(padded, kernel, groups=maps.shape[1])


def box_gaussian(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h, w) Gaussian over a box, coordinates in [-1, 1], sigma 1, peak 1 at the centre."""
    y = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    x = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    return torch.exp(-(y[:, None].square() + x[None, :].square()) / 2)


def composer_loss(maps: AttentionMaps, regions: Sequence[Region], size: tuple[int, int],
                  weights: ComposerLossWeights, cells: str = "inside") -> torch.Tensor:
    """L = concept · L_ce + fill · L_fill + region · L_region per image, (B,) (sec. 3.4):
    - L_ce = Σ max(0, 1 - mean top-k(A ⊙ M ⊙ G)) per concept token (A: its smoothed map, M: the box,
      G: a Gaussian centred on it);
    - L_fill = Σ L1(column max of A ⊙ M, the box's columns) + L1(row max, the box's rows);
    - L_region = Σ_n mean top-k of the self-attention from box n's queries to keys outside it."""
    h, w = size
    self_attention = torch.stack(maps.self_attention).mean(dim=0) if maps.self_attention else None  # (B, N, N)
    total: torch.Tensor | float = 0.0  # (B,) once a term is added
    for i, region in enumerate(regions):
        mask = box_mask(region.box, h, w, cells)
        k = max(1, int(weights.top_k_ratio * mask.sum()))
        token_maps = maps.region_maps(i, h, w)
        if token_maps is not None:
            a = smooth(token_maps.float())  # (B, T, h, w)
            m = mask.to(a.device, a.dtype)
            top, left, bottom, right = box_cells(region.box, h, w, cells)
            g = torch.ones_like(m)
            g[top:bottom, left:right] = box_gaussian(bottom - top, right - left, a.device, a.dtype)
            strongest = (a * m * g).flatten(2).topk(k, dim=-1).values.mean(dim=-1)  # (B, T)
            total = total + weights.concept * (1 - strongest).clamp(min=0).sum(dim=-1)
            inside = a * m
            total = total + weights.fill * ((inside.amax(dim=2) - m.amax(dim=0)).abs().mean(dim=-1)
                                            + (inside.amax(dim=3) - m.amax(dim=1)).abs().mean(dim=-1)).sum(dim=-1)
        if self_attention is not None and not mask.all():
            inside = mask.flatten().to(self_attention.device)
            leak = self_attention[:, inside][:, :, ~inside].flatten(1).float()  # (B, n_in * n_out)
            total = total + weights.region * leak.topk(min(k, leak.shape[1]), dim=-1).values.mean(dim=-1)
    return total if isinstance(total, torch.Tensor) else torch.zeros(())  # nothing recorded: 0, broadcastable


def reinitialise_latents(latents: torch.Tensor, maps: AttentionMaps, regions: Sequence[Region],
                         size: tuple[int, int], cells: str = "inside") -> torch.Tensor:
    """Sec. 3.5: for each region, the window of the box's size where its tokens' summed map is largest (a box
    filter's argmax) has its latent patch copied into the box; then each image's latent gets its original mean
    and standard deviation back."""
    h, w = size
    scale = latents.shape[-2] // h
    out = latents.clone()
    for i, region in enumerate(regions):
        token_maps = maps.region_maps(i, h, w)
        if token_maps is None:
            continue
        top, left, bottom, right = box_cells(region.box, h, w, cells)
        kernel = torch.ones(1, 1, bottom - top, right - left, device=latents.device)
        scores = F.conv2d(token_maps.float().sum(dim=1, keepdim=True), kernel)  # (B, 1, h - bh + 1, w - bw + 1)
        for b in range(latents.shape[0]):
            y, x = divmod(int(scores[b, 0].argmax()), scores.shape[-1])
            patch = latents[b, :, y * scale:(y + bottom - top) * scale, x * scale:(x + right - left) * scale]
            out[b, :, top * scale:bottom * scale, left * scale:right * scale] = patch
    dims = tuple(range(1, latents.ndim))
    standardised = (out - out.mean(dim=dims, keepdim=True)) / out.std(dim=dims, keepdim=True)
    return standardised * latents.std(dim=dims, keepdim=True) + latents.mean(dim=dims, keepdim=True)
