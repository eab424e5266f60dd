"""The UNet's long skip connections, and hooks that edit them (SC-Tuner, CSC-Tuner).

In diffusers' `UpBlock2D` / `CrossAttnUpBlock2D` each resnet pops one encoder feature, concatenates
`[hidden_states, skip]` on channels and runs; the skip is therefore the *last* C_skip channels of
the resnet's input. A forward-pre-hook on `up_blocks[b].resnets[r]` replaces those channels and
lets the unmodified resnet run: no fork of the UNet. FreeU rescales the skip before the
concatenation, so an editor sees the rescaled tensor.

Several adapters may edit the same skips (an SC-Tuner and one CSC-Tuner per condition). SCEdit
adds their terms, each computed from the *original* skip (SCEdit, Jiang et al., CVPR 2024,
arXiv 2312.11392, sec. 3; docs/methods.md):

    x' = x + s_sc T_sc(x) + sigma sum_k s_k h_k(x)

so an editor returns a delta, never a new skip, and each resnet carries one shared hook that sums
the deltas of every registered editor. Chained hooks would feed one tuner's output into the next.

Down-block outputs are deliberately not hooked (ms-swift's "encoder" mode): in diffusers those
tensors also feed the next encoder block, so editing them would change more than the skip.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# delta(skip key "b.r", skip x) -> the editor's additive term for x, or None for none.
SkipDelta = Callable[[str, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class Skip:
    """One long skip connection, named by the decoder resnet that consumes it."""

    block: int  # index into unet.up_blocks
    resnet: int  # index into up_blocks[block].resnets
    channels: int  # C_skip: width of the encoder feature concatenated there
    # The encoder feature is a downsampler's output, at half the resolution of the feature pushed before
    # it (CSC-Tuner's hint chain strides there). False for conv_in's output and every resnet's.
    downsampled: bool = False

    @property
    def key(self) -> str:
        return f"{self.block}.{self.resnet}"


def long_skips(unet: nn.Module) -> list[Skip]:
    """Every long skip of a diffusers UNet2DConditionModel, in decoder order (`up_blocks.b.resnets.r`),
    which is the reverse of the encoder order the features were pushed in.

    The encoder pushes conv_in's output, then each down resnet's and each downsampler's output;
    the decoder pops them in reverse. Each width is checked against the consuming resnet:
    conv1 sees (channels arriving from the previous layer) + C_skip."""
    pushed = [(unet.conv_in.out_channels, False)]  # (channels, downsampled), in encoder order
    for block in unet.down_blocks:
        pushed += [(resnet.out_channels, False) for resnet in block.resnets]
        pushed += [(down.out_channels, True) for down in block.downsamplers or ()]
    hidden = unet.mid_block.resnets[-1].out_channels if unet.mid_block is not None else pushed[-1][0]

    skips = []
    for b, block in enumerate(unet.up_blocks):
        for r, resnet in enumerate(block.resnets):
            if not pushed:
                raise ValueError(f"up_blocks.{b}.resnets.{r} has no encoder feature left: unsupported UNet layout")
            channels, downsampled = pushed.pop()
            if resnet.conv1.in_channels != hidden + channels:
                raise ValueError(
                    f"up_blocks.{b}.resnets.{r}: conv1 takes {resnet.conv1.in_channels} channels, but the decoder "
                    f"brings {hidden} and the skip {channels}: unsupported UNet layout"
                )
            skips.append(Skip(b, r, channels, downsampled))
            hidden = resnet.out_channels
    if pushed:
        raise ValueError(f"{len(pushed)} encoder features are never consumed by the decoder: unsupported UNet layout")
    return skips


def hook_skips(unet: nn.Module, skips: list[Skip], delta: SkipDelta) -> list[SkipHandle]:
    """Register `delta` as an editor of each skip: the skip x becomes x + (sum of every editor's
    `delta(skip.key, x)`), all computed from the same x. `delta` gets the skip alone (B, C_skip, H, W)
    and returns a tensor of that shape and dtype, or None for "no change" (e.g. at scale 0).

    Removing the returned handles unregisters the editor; the last editor of a resnet removes its
    hook, so the UNet is restored exactly once every editor is gone."""
    handles = []
    for skip in skips:
        resnet = unet.up_blocks[skip.block].resnets[skip.resnet]
        editors = resnet.__dict__.get(_EDITORS_KEY)
        if editors is None:
            editors = _SkipEditors(skip)
            object.__setattr__(resnet, _EDITORS_KEY, editors)  # kept on the resnet: it goes with the UNet
            editors.handle = resnet.register_forward_pre_hook(editors, with_kwargs=True)
        elif editors.skip != skip:
            raise ValueError(f"up_blocks.{skip.block}.resnets.{skip.resnet} is already edited as {editors.skip}, "
                             f"not {skip}: the editors were built for different UNets")
        handles.append(SkipHandle(resnet, editors, delta))
    return handles


class _SkipEditors:
    """The one forward-pre-hook of a decoder resnet: skip x -> x + sum of the editors' deltas of x."""

    def __init__(self, skip: Skip):
        self.skip = skip
        self.deltas: dict[int, SkipDelta] = {}  # handle id -> editor, in registration order
        self.handle: RemovableHandle | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        # ResnetBlock2D.forward(input_tensor, temb): the up blocks pass it positionally, but accept a keyword too.
        hidden = args[0] if args else kwargs["input_tensor"]
        # (B, C_prev + C_skip, H, W) -> (B, C_prev, H, W) | (B, C_skip, H, W)
        keep, x = hidden.split([hidden.shape[1] - self.skip.channels, self.skip.channels], dim=1)
        deltas = [d for delta in self.deltas.values() if (d := delta(self.skip.key, x)) is not None]
        if not deltas:
            return None  # the input untouched: bit-identical to the bare UNet
        # Sum the deltas first, then add once: for two editors the result is independent of their order.
        hidden = torch.cat([keep, x + functools.reduce(torch.add, deltas)], dim=1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "input_tensor": hidden}


class SkipHandle:
    """Unregisters one editor from one resnet (`remove()`), as torch's RemovableHandle does for a hook."""

    def __init__(self, resnet: nn.Module, editors: _SkipEditors, delta: SkipDelta):
        self._resnet, self._editors = resnet, editors
        self.id = next(_handle_ids)
        editors.deltas[self.id] = delta

    def remove(self) -> None:
        editors = self._editors
        editors.deltas.pop(self.id, None)
        if not editors.deltas and self._resnet.__dict__.get(_EDITORS_KEY) is editors:
            editors.handle.remove()
            del self._resnet.__dict__[_EDITORS_KEY]


# The attribute of a decoder resnet that holds its shared hook (a plain attribute: not a submodule).
_EDITORS_KEY = "studio_skip_editors"
_handle_ids = itertools.count()
