"""SC-Tuner (SCEdit: Jiang et al., CVPR 2024, arXiv 2312.11392): a residual channel MLP on every long skip.

For the skip x (B, C, H, W) feeding decoder resnet `up_blocks[b].resnets[r]`:
    T(x) = W2 GELU(W1 x + b1) + b2,    W1: C -> L, W2: L -> C,  L = floor(C * hidden_ratio)
    x'   = x + s T(x)
The UNet stays frozen and every trainable weight sits at the encoder -> decoder hand-off, so no
autograd graph is recorded in the encoder or mid block (SCEdit sec. 3.2; docs/methods.md).
12 tuners on SD 1.x/2.x (19.68 M parameters at hidden_ratio 1.0), 9 on SDXL (9.84 M).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .base import Adapter, device_of, option, register
from .checks import is_number
from .skips import SkipHandle, hook_skips, long_skips


@dataclass
class SCTunerConfig:
    # r_down: hidden width L = floor(C * hidden_ratio). 1.0, the paper's default, means no bottleneck.
    hidden_ratio: float = option(1.0, "hidden width of each skip tuner as a share of its channels (1.0: the "
                                 "paper's, no bottleneck)", minimum=0.01, maximum=4.0)

    def __post_init__(self) -> None:
        self.hidden_ratio = check_hidden_ratio("SCTunerConfig", self.hidden_ratio)


def check_hidden_ratio(owner: str, ratio: object) -> float:
    """`ratio` as a float, or a ValueError naming `owner`.hidden_ratio (shared by SC- and CSC-Tuner configs)."""
    if not is_number(ratio, 0, inclusive=False):
        raise ValueError(f"{owner}.hidden_ratio must be a number > 0 (1.0 is the paper's), got {ratio!r}")
    return float(ratio)


class SkipMLP(nn.Module):
    """T(x) = W2 GELU(W1 x + b1) + b2 per pixel, as 1x1 convs (a Linear over channels without permutes).

    W1, b1 keep PyTorch's default init (kaiming-uniform, a=sqrt(5)) as in the reference; W2, b2 start
    at zero so that the tuned UNet equals the base at step 0. Consequence: at step 0 only W2, b2 get
    gradient (W1's passes through W2 = 0)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def module_name(key: str) -> str:
    """Skip key "b.r" -> ModuleDict name "up_blocks_b_resnets_r" (module names cannot hold dots)."""
    block, resnet = key.split(".")
    return f"up_blocks_{block}_resnets_{resnet}"


def skip_mlps(widths: dict[str, int], hidden_ratio: float, owner: str) -> nn.ModuleDict:
    """One SkipMLP per skip key "b.r" of width C, with L = floor(C * hidden_ratio) hidden units."""
    mlps = nn.ModuleDict()
    for key, channels in widths.items():
        # + 1e-6: floor(C * r) without float error turning e.g. 640 * 0.3 into 191.
        hidden = int(channels * hidden_ratio + 1e-6)
        if hidden < 1:
            raise ValueError(
                f"{owner}.hidden_ratio={hidden_ratio} leaves the {channels}-channel skip {key} "
                f"without hidden units; use hidden_ratio >= {1 / channels:.4g}"
            )
        mlps[module_name(key)] = SkipMLP(channels, hidden)
    return mlps


_FC1_KEY = re.compile(r"tuners\.up_blocks_(\d+)_resnets_(\d+)\.fc1\.weight")


def widths_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Skip key "b.r" -> C_skip, in decoder order, read from the `tuners.*.fc1.weight` shapes (L, C, 1, 1) of
    a saved file; every other shape is checked by load_tensors' strict load."""
    found = {(int(m[1]), int(m[2])): shape[1] for name, shape in shapes.items() if (m := _FC1_KEY.fullmatch(name))}
    return {f"{b}.{r}": found[b, r] for b, r in sorted(found)}


@register
class SCTuner(Adapter):
    """One `SkipMLP` per long skip, keyed by the consuming resnet; attached by forward-pre-hooks.

    `widths` maps skip keys "b.r" to C_skip. Build with `from_unet(unet)` (widths read from the UNet)
    or `from_shapes` (widths read from a saved file's tensor shapes)."""

    method = "sc_tuner"
    config_class = SCTunerConfig
    label = "SC-Tuner"
    summary = ("SCEdit's skip-connection tuners: light (no graph through the encoder). It edits the skip features "
               "of every batch row, the unconditional one too: on the Shapes style it draws the outlines at CFG 1.5 "
               "and loses them at CFG 7.5, where guidance amplifies what both branches now share. Off the "
               "unconditional branch (untick 'Adapters on the negative prompt too' in Generate) it keeps 33-50 % of "
               "them on 8-20 images and 4 % on 40, where LoRA meets the targets. It never reads the prompt: it must "
               "tell the trigger from the skip features alone, so it suits a whole domain more than a triggered "
               "style beside prior preservation (with the prior's weight at 0.001: 58 %, base prompts lose 7.9 "
               "points; docs/benchmarks.md, sessions 14, 19 and 21).")

    def __init__(self, config: SCTunerConfig, widths: dict[str, int]):
        super().__init__(config)
        self.widths = dict(widths)
        self.tuners = skip_mlps(self.widths, config.hidden_ratio, "SCTunerConfig")
        self._handles: list[SkipHandle] = []

    @classmethod
    def from_unet(cls, unet: nn.Module, config: SCTunerConfig | None = None) -> SCTuner:
        with torch.device(device_of(unet)):
            adapter = cls(config or SCTunerConfig(), {skip.key: skip.channels for skip in long_skips(unet)})
        adapter.record_base(unet)
        return adapter

    @classmethod
    def from_shapes(cls, config: SCTunerConfig, shapes: dict[str, tuple[int, ...]]) -> SCTuner:
        return cls(config, widths_from_shapes(shapes))

    # -- wiring -------------------------------------------------------------------------
    def _attach(self, unet: nn.Module) -> None:
        skips = long_skips(unet)
        found = {skip.key: skip.channels for skip in skips}
        if found != self.widths:
            raise ValueError(
                f"this SC-Tuner was built for {len(self.widths)} skips {self.widths}, but the UNet has "
                f"{len(found)} skips {found}; build one for this model with SCTuner.from_unet(unet)"
            )
        self.to(device_of(unet))
        self._handles = hook_skips(unet, skips, self.delta_skip)

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def delta_skip(self, key: str, x: torch.Tensor) -> torch.Tensor | None:
        """s T(x), the term this tuner adds to the skip x (adapters/skips.py sums every editor's).
        The tuner runs in its own dtype (fp32 master weights under an fp16 UNet); s = 0 adds nothing,
        so the base output is reproduced exactly."""
        if self.scale == 0:
            return None
        tuner = self.tuners[module_name(key)]
        return self.scale_for(x) * tuner(x.to(tuner.fc1.weight.dtype)).to(x.dtype)
