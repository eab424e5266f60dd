"""The UNet's long skip connections, and hooks that edit them in place (SC-Tuner, CSC-Tuner).

In diffusers' `UpBlock2D` / `CrossAttnUpBlock2D` each resnet pops one encoder feature, concatenates
`[hidden_states, skip]` on channels and runs; the skip is therefore the *last* C_skip channels of
the resnet's input. A forward-pre-hook on `up_blocks[b].resnets[r]` replaces those channels with
`edit(key, skip)` and lets the unmodified resnet run: no fork of the UNet. FreeU rescales the skip
before the concatenation, so an editor sees the rescaled tensor.

Down-block outputs are deliberately not hooked (ms-swift's "encoder" mode): in diffusers those
tensors also feed the next encoder block, so editing them would change more than the skip.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

SkipEdit = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Skip:
    """One long skip connection, named by the decoder resnet that consumes it."""

    block: int  # index into unet.up_blocks
    resnet: int  # index into up_blocks[block].resnets
    channels: int  # C_skip: width of the encoder feature concatenated there

    @property
    def key(self) -> str:
        return f"{self.block}.{self.resnet}"


def long_skips(unet: nn.Module) -> list[Skip]:
    """Every long skip of a diffusers UNet2DConditionModel, in decoder order (`up_blocks.b.resnets.r`).

    The encoder pushes conv_in's output, then each down resnet's and each downsampler's output;
    the decoder pops them in reverse. Each width is checked against the consuming resnet:
    conv1 sees (channels arriving from the previous layer) + C_skip."""
    pushed = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        pushed += [resnet.out_channels for resnet in block.resnets]
        pushed += [down.out_channels for down in block.downsamplers or ()]
    hidden = unet.mid_block.resnets[-1].out_channels if unet.mid_block is not None else pushed[-1]

    skips = []
    for b, block in enumerate(unet.up_blocks):
        for r, resnet in enumerate(block.resnets):
            if not pushed:
                raise ValueError(f"up_blocks.{b}.resnets.{r} has no encoder feature left: unsupported UNet layout")
            channels = pushed.pop()
            if resnet.conv1.in_channels != hidden + channels:
                raise ValueError(
                    f"up_blocks.{b}.resnets.{r}: conv1 takes {resnet.conv1.in_channels} channels, but the decoder "
                    f"brings {hidden} and the skip {channels}: unsupported UNet layout"
                )
            skips.append(Skip(b, r, channels))
            hidden = resnet.out_channels
    if pushed:
        raise ValueError(f"{len(pushed)} encoder features are never consumed by the decoder: unsupported UNet layout")
    return skips


def hook_skips(unet: nn.Module, skips: list[Skip], edit: SkipEdit) -> list[RemovableHandle]:
    """Register one forward-pre-hook per skip that replaces it by `edit(skip.key, x)`.

    Removing the returned handles restores the UNet exactly. `edit` must return a tensor of the
    skip's shape; it is called with the skip alone (B, C_skip, H, W)."""
    return [
        unet.up_blocks[skip.block].resnets[skip.resnet].register_forward_pre_hook(
            functools.partial(_edit_skip_hook, skip=skip, edit=edit), with_kwargs=True
        )
        for skip in skips
    ]


def _edit_skip_hook(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], *, skip: Skip, edit: SkipEdit
) -> tuple[tuple, dict[str, Any]]:
    # ResnetBlock2D.forward(input_tensor, temb): the up blocks pass it positionally, but accept a keyword too.
    hidden = args[0] if args else kwargs["input_tensor"]
    # (B, C_prev + C_skip, H, W) -> (B, C_prev, H, W) | (B, C_skip, H, W)
    keep, x = hidden.split([hidden.shape[1] - skip.channels, skip.channels], dim=1)
    hidden = torch.cat([keep, edit(skip.key, x)], dim=1)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "input_tensor": hidden}
