"""The per-call context: what a pipeline tells every attached adapter and attention processor about the
UNet batch it is about to denoise, and the one registry of what is attached to a UNet.

Each pipeline encodes its prompts itself, so it knows which UNet batch row is which; before its denoising
loop it builds one `CallContext` and runs the loop inside `call_context(unet, ctx)`. Adapters read it in
`Adapter.prepare(ctx)` (called on entry and exit) or, like attention processors, at run time through
`current_context(unet)`: a controller takes its hint from `ctx.hints`, uniform attention its rows from the
branches, a regional method its boxes from `ctx.regions`, a membrane its per-row strength from the prompts.

The registry (`attachments(unet)`) lives on the UNet object itself, so it goes away with the UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .base import Adapter

# What a row of the UNet batch is: classifier-free guidance's unconditional and conditional branches, an
# editing pipeline's source and target branches, UAM's uniform-attention reconstruction, a training example.
BRANCHES = ("uncond", "cond", "source", "target", "uniform", "train")


@dataclass(frozen=True)
class Row:
    """One row of the UNet batch: the prompt it is conditioned on and its branch (one of BRANCHES)."""

    prompt: str
    branch: str

    def __post_init__(self) -> None:
        if self.branch not in BRANCHES:
            raise ValueError(f"Row.branch={self.branch!r} is not one of {BRANCHES}")


@dataclass(frozen=True)
class Region:
    """A part of the image with its own prompt (LoRA-Composer, adapters/composer.py).

    box: (x0, y0, x1, y1) as fractions of the image's width and height; text_embeds: (B, L, D), row i's
    region prompt embedded (the region's negative prompt on unconditional rows); adapter: the concept whose
    weight deltas act inside the box (None: the base weights); token_indices: the positions of the concept's
    tokens in the region prompt, whose attention maps the composer's losses steer."""

    box: tuple[float, float, float, float]
    prompt: str
    text_embeds: torch.Tensor | None = None
    adapter: Adapter | None = None
    token_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"Region.box={self.box!r} must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and "
                             "0 <= y0 < y1 <= 1 (fractions of the image)")


@dataclass(frozen=True)
class TextEncoding:
    """The call's own text encoding, for adapters that compare other texts with the rows' prompts (a membrane
    measures each prompt against its erased concepts, adapters/spm.py): `encode(texts)` gives what `text_embeds`
    and `token_ids` hold for the rows, (N, L, D) and (N, L); `special_ids` are the ids that are no word (BOS, EOS,
    padding)."""

    encode: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]
    special_ids: frozenset[int]


@dataclass
class CallContext:
    """What one pipeline call runs: per UNet batch row its prompt and branch, and what every row shares."""

    rows: list[Row]
    text_embeds: torch.Tensor | None = None  # (B, L, D), row i conditioned on text_embeds[i]
    token_ids: torch.Tensor | None = None  # (B, L), the tokens behind text_embeds
    image_size: tuple[int, int] | None = None  # (width, height) in pixels
    hints: Mapping[str, torch.Tensor] = field(default_factory=dict)  # condition -> (B_hint, 3, H, W) in [0, 1]
    regions: Sequence[Region] = ()
    text_encoding: TextEncoding | None = None  # None: the pipeline encodes no other texts for its adapters
    # The UNet's `added_cond_kwargs` for these rows, as the pipeline passes them: SDXL's "text_embeds" (B, P), the
    # pooled text, and "time_ids" (B, 6), the size conditions. None for a UNet without added conditions (SD 1/2).
    # Carried here so that a pipeline with its own loop (editing) and adapters see what conditions each row.
    added_cond: Mapping[str, torch.Tensor] | None = None
    # False: the adapters leave classifier-free guidance's unconditional rows to the base model (A1111's Composable
    # LoRA, "Use LoRA in uncond" off), so guidance amplifies the whole of what they add (docs/methods.md,
    # "A subject at CFG 7.5").
    adapters_on_uncond: bool = True

    def __post_init__(self) -> None:
        named = [("text_embeds", self.text_embeds), ("token_ids", self.token_ids)]
        named += [(f"added_cond[{key!r}]", value) for key, value in (self.added_cond or {}).items()]
        for name, value in named:
            if value is not None and value.shape[0] != len(self.rows):
                raise ValueError(f"CallContext.{name} has {value.shape[0]} rows but there are {len(self.rows)} rows")
        for i, region in enumerate(self.regions):
            if region.text_embeds is not None and region.text_embeds.shape[0] != len(self.rows):
                raise ValueError(f"CallContext.regions[{i}].text_embeds has {region.text_embeds.shape[0]} rows but "
                                 f"there are {len(self.rows)} rows")

    @classmethod
    def of_branches(cls, branches: Sequence[str], **shared) -> CallContext:
        """A context whose rows are only branches (no prompts): tests and hand-made UNet calls."""
        return cls(rows=[Row("", branch) for branch in branches], **shared)

    def adapter_row_scales(self) -> torch.Tensor | None:
        """(B,) float: 0 on the unconditional rows when the adapters stay off them, else None (every row)."""
        if self.adapters_on_uncond:
            return None
        return (~self.row_mask("uncond")).float()

    def row_mask(self, *branches: str) -> torch.Tensor:
        """(B,) bool on the CPU: the rows in any of `branches`."""
        return torch.tensor([row.branch in branches for row in self.rows], dtype=torch.bool)


class Attachments:
    """What is attached to one UNet: its adapters in attach order, and the context of the call running now."""

    def __init__(self) -> None:
        self.adapters: list[Adapter] = []
        self.context: CallContext | None = None


_KEY = "studio_attachments"


def attachments(unet: nn.Module) -> Attachments:
    """The registry of `unet`, created on first use and kept on the UNet object."""
    found = unet.__dict__.get(_KEY)
    if found is None:
        found = Attachments()
        object.__setattr__(unet, _KEY, found)  # a plain attribute: not a submodule, not in the state dict
    return found


def attached_adapters(unet: nn.Module, kind: type | None = None) -> list[Adapter]:
    """The adapters attached to `unet` (of class `kind` if given), in attach order."""
    return [a for a in attachments(unet).adapters if kind is None or isinstance(a, kind)]


def current_context(unet: nn.Module) -> CallContext | None:
    """The context of the call `unet` is running, or None outside any pipeline call."""
    return attachments(unet).context


@contextmanager
def call_context(unet: nn.Module, ctx: CallContext) -> Iterator[CallContext]:
    """Within the block, `unet`'s adapters (also ones attached inside it) and processors see `ctx`; on exit the
    previous context (None, or an enclosing call's) is back and the adapters are prepared for it again."""
    state = attachments(unet)
    previous = state.context
    state.context = ctx
    try:
        for adapter in list(state.adapters):
            adapter.prepare_call(ctx)
        yield ctx
    finally:
        state.context = previous
        for adapter in list(state.adapters):
            adapter.prepare_call(previous)
