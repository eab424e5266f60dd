"""CSC-Tuner (SCEdit: Jiang et al., CVPR 2024, arXiv 2312.11392): control through the long skips.

A hint (a 3-channel image in [0, 1] at pixel resolution: Canny edges, a colour palette, a sketch) goes
through a small pre-encoder to latent resolution, then a zero-initialised dense chain that yields one
condition feature c_i per encoder skip x_i, of x_i's shape. At the decoder resnet consuming x_j:

    h_j  = T_j(x_j + c_j) + c_j          T_j: a condition-specific SkipMLP (zero-init last layer)
    x_j' = x_j + s h_j                   s: this module's `scale` (the paper's sigma_ctrl * s_k)

Each condition is its own CSCTuner with its own scale; several, and a plain SC-Tuner, may be attached
at once: adapters/skips.py adds every editor's term, each computed from the original x_j. The hint is
the call's: `ctx.hints[condition]` of the pipeline's per-call context (adapters/context.py). The features
are computed once per UNet call, by a forward-pre-hook on the UNet; the hint batch is tiled to the UNet
batch (classifier-free guidance runs [uncond; cond] as one batch of twice the images, and both branches
are controlled, as ControlNet does).

Parameters on SD 1.5: pre-encoder 0.35 M, chain 79.1 M (3x3) or 8.8 M (1x1), tuners 19.68 M; totals
99.1 M and 28.8 M. SDXL, 3x3: 45.9 M (SCEdit sec. 3.3 and its released configs; docs/methods.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .base import Adapter, Recommendation, detect_family, device_of, option, register
from .checks import is_int, is_number
from .context import CallContext, current_context
from .sc_tuner import check_hidden_ratio, module_name, skip_mlps, widths_from_shapes
from .skips import Skip, SkipHandle, hook_skips, long_skips

CONDITION_NAME = re.compile(r"[a-z][a-z0-9_]*")
# The pre-encoder's six inner widths before width_mult; its seventh conv outputs C_pre (SCEdit's released
# code; docs/methods.md).
PRE_ENCODER_WIDTHS = (16, 16, 32, 32, 96, 96)
# The convs that stride in the reference (3rd, 5th, 7th): 8x from pixels to latents. A VAE that
# downsamples by 2^n strides in the first n of them.
STRIDED_CONVS = (2, 4, 6)
VAE_SCALE_FACTORS = tuple(2**n for n in range(len(STRIDED_CONVS) + 1))  # 1, 2, 4, 8


# The conditions the studio's annotators draw (pipelines/annotators.py); a tuner may name another.
KNOWN_CONDITIONS = ("canny", "color", "sketch")


@dataclass
class CSCTunerConfig:
    # What the hints show. Recorded in the adapter file; a control image of another condition is refused.
    # A lowercase name (the CLI writes condition:image).
    condition: str = option("canny", "what the control images show; the annotator of that name draws the hint "
                            "from each training image", choices=KNOWN_CONDITIONS, ui=True)
    # 3 in the released configs (99.1 M parameters on SD 1.5), 1 for the light variant (28.8 M) that matches
    # the paper's "7.9 % of ControlNet".
    dense_kernel: int = option(3, "kernel of the dense chain's convs: 3 as released, 1 for the light variant",
                               choices=(3, 1))
    hidden_ratio: float = option(1.0, "hidden width of the condition tuners as a share of their channels",
                                 minimum=0.01, maximum=4.0)
    # None: 256 on SD 1.x/2.x, 320 on SDXL (the reference's); on other widths (tiny test models, the embedded
    # Shapes model) the width of conv_in's output.
    pre_channels: int | None = option(None, "the pre-encoder's output width (blank: chosen for the model)",
                                      minimum=1)
    # None: 1.0 on SD 1.x/2.x, 2.0 on SDXL (the reference's).
    width_mult: float | None = option(None, "multiplies the pre-encoder's widths (blank: chosen for the model)",
                                      minimum=0.07)
    # 8 for SD 1.x/2.x/XL, 4 for the embedded Shapes model. The pre-encoder has log2 of it stride-2 convs.
    vae_scale_factor: int = option(8, "the VAE's pixel -> latent downsampling (read from the model)",
                                   choices=VAE_SCALE_FACTORS, from_model="vae_scale_factor")

    def __post_init__(self) -> None:
        if not isinstance(self.condition, str) or not CONDITION_NAME.fullmatch(self.condition):
            raise ValueError(f"CSCTunerConfig.condition must be a lowercase name such as 'canny' (letters, digits, "
                             f"'_'), got {self.condition!r}")
        k = self.dense_kernel
        if not is_int(k, 1) or k % 2 == 0:
            raise ValueError(f"CSCTunerConfig.dense_kernel must be an odd integer >= 1 (3 as released, 1 for the "
                             f"light variant), got {k!r}")
        self.hidden_ratio = check_hidden_ratio("CSCTunerConfig", self.hidden_ratio)
        c = self.pre_channels
        if c is not None and not is_int(c, 1):
            raise ValueError(f"CSCTunerConfig.pre_channels must be an integer >= 1, or None to choose it from the "
                             f"model, got {c!r}")
        m = self.width_mult
        if m is not None:
            if not is_number(m, 0, inclusive=False):
                raise ValueError(f"CSCTunerConfig.width_mult must be a number > 0, or None to choose it from the "
                                 f"model, got {m!r}")
            if round(min(PRE_ENCODER_WIDTHS) * m) < 1:
                raise ValueError(f"CSCTunerConfig.width_mult={m} leaves a pre-encoder conv without channels; use "
                                 f"width_mult >= {1 / min(PRE_ENCODER_WIDTHS):.4g}")
            self.width_mult = float(m)
        f = self.vae_scale_factor
        if not is_int(f) or f not in VAE_SCALE_FACTORS:
            raise ValueError(f"CSCTunerConfig.vae_scale_factor must be one of {VAE_SCALE_FACTORS} (the model's "
                             f"pipe.vae_scale_factor), got {self.vae_scale_factor!r}")

    def for_unet(self, unet: nn.Module) -> CSCTunerConfig:
        """This config with pre_channels and width_mult chosen for `unet` where None, so that the adapter
        file records the architecture it holds."""
        family = detect_family(unet)
        first = unet.conv_in.out_channels
        pre_channels = self.pre_channels
        if pre_channels is None:
            pre_channels = (320 if family == "SDXL" else 256) if first == 320 else first
        width_mult = self.width_mult if self.width_mult is not None else (2.0 if family == "SDXL" else 1.0)
        return dataclasses.replace(self, pre_channels=pre_channels, width_mult=width_mult)


def pre_encoder(config: CSCTunerConfig) -> nn.Sequential:
    """Seven 3x3 convs, SiLU between them, none after the last; default init (not zero): hint (B, 3, H, W)
    -> (B, C_pre, H / f, W / f), f = vae_scale_factor. Widths 3 -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> C_pre."""
    widths = [3, *(round(w * config.width_mult) for w in PRE_ENCODER_WIDTHS), config.pre_channels]
    strided = STRIDED_CONVS[:int(math.log2(config.vae_scale_factor))]
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
        if layers:
            layers.append(nn.SiLU())
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=2 if i in strided else 1, padding=1))
    return nn.Sequential(*layers)


def dense_block(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    """SiLU, then a zero-initialised k x k conv: the chain, and so the control, starts at exactly zero.
    Stride 2 where the encoder feature is a downsampler's output; padding k // 2 halves H as that does."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.SiLU(), conv)


def skips_from_widths(widths: dict[str, int]) -> list[Skip]:
    """Skips (decoder order) of a saved file's widths. Which encoder features are downsampler outputs
    is not in the tensor shapes: diffusers' layout puts one as the last skip of every up block but the
    final one (its mirror down block ends with the downsampler). `attach` checks it against the UNet."""
    keys = [tuple(map(int, key.split("."))) for key in widths]
    last_block = max(b for b, _ in keys)
    last_resnet = {b: max(r for bb, r in keys if bb == b) for b, _ in keys}
    return [Skip(b, r, widths[f"{b}.{r}"], downsampled=b != last_block and r == last_resnet[b]) for b, r in keys]


def check_hint(hint: object) -> None:
    """Refuse a hint a CSC-Tuner cannot read: it must be a float tensor (B, 3, H, W) in [0, 1]."""
    if not isinstance(hint, torch.Tensor) or hint.ndim != 4 or hint.shape[1] != 3 or not hint.is_floating_point():
        what = f"{tuple(hint.shape)} {hint.dtype}" if isinstance(hint, torch.Tensor) else type(hint).__name__
        raise ValueError(f"the hint must be a float tensor (B, 3, H, W), got {what}; "
                         "pipelines.annotators.prepare_hint makes one from an image")
    low, high = hint.min().item(), hint.max().item()  # one sync per call, not per step
    if low < 0 or high > 1:
        raise ValueError(f"the hint must lie in [0, 1] (a [-1, 1] hint degrades control silently, SCEdit's "
                         f"reference code reads [0, 1]), got values in [{low:.3g}, {high:.3g}]; a [-1, 1] hint "
                         "becomes (hint + 1) / 2")


@register
class CSCTuner(Adapter):
    """Pre-encoder + dense chain + one condition tuner per long skip; attached by hooks.

    `skips` are the UNet's long skips in decoder order; `config` must be resolved (`for_unet`).
    Build with `from_unet(unet, config)`, attach it, and run the UNet inside a call context whose
    `hints[condition]` is the control image."""

    method = "csc_tuner"
    config_class = CSCTunerConfig
    label = "CSC-Tuner (controller)"
    summary = ("SCEdit's controllable tuner: learns to follow a condition (Canny edges, a colour map, a sketch) "
               "drawn from each training image; used with a control image in the Generate tab.")
    needs_hints = True
    caption_dropout = 0.5  # as ControlNet trains: half the images without text, so it must read the hint
    recommended_for = {"control": Recommendation({}, "the only method that learns a control condition")}

    def __init__(self, config: CSCTunerConfig, skips: list[Skip]):
        if config.pre_channels is None or config.width_mult is None:
            raise ValueError("CSCTuner needs a config with pre_channels and width_mult set; build it with "
                             "CSCTuner.from_unet(unet, config), which chooses them for the model")
        super().__init__(config)
        self.skips = list(skips)
        self.pre_encoder = pre_encoder(config)
        # One block per encoder skip, in encoder order (the reverse of the decoder order of `skips`).
        self.chain = nn.ModuleList()
        previous = config.pre_channels
        for skip in reversed(self.skips):
            self.chain.append(dense_block(previous, skip.channels, config.dense_kernel, 2 if skip.downsampled else 1))
            previous = skip.channels
        self.tuners = skip_mlps({skip.key: skip.channels for skip in self.skips}, config.hidden_ratio,
                                "CSCTunerConfig")
        self._features: dict[str, torch.Tensor] | None = None  # skip key -> c_j tiled to the UNet batch
        self._handles: list[SkipHandle | RemovableHandle] = []

    @classmethod
    def from_unet(cls, unet: nn.Module, config: CSCTunerConfig | None = None) -> CSCTuner:
        with torch.device(device_of(unet)):
            adapter = cls((config or CSCTunerConfig()).for_unet(unet), long_skips(unet))
        adapter.record_base(unet)
        return adapter

    @classmethod
    def from_shapes(cls, config: CSCTunerConfig, shapes: dict[str, tuple[int, ...]]) -> CSCTuner:
        # Every shape (pre-encoder, chain, tuners) is then checked by load_tensors' strict load.
        return cls(config, skips_from_widths(widths_from_shapes(shapes)))

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts by part: pre_encoder, chain, tuners, and their total (docs/methods.md, CSC-Tuner)."""
        parts = {name: sum(p.numel() for p in getattr(self, name).parameters())
                 for name in ("pre_encoder", "chain", "tuners")}
        return {**parts, "total": sum(parts.values())}

    # -- wiring -------------------------------------------------------------------------
    @classmethod
    def hint_condition(cls, config: CSCTunerConfig) -> str:
        return config.condition

    def _attach(self, unet: nn.Module) -> None:
        skips = long_skips(unet)
        if skips != self.skips:
            raise ValueError(
                f"this CSC-Tuner was built for {len(self.skips)} skips {self._describe(self.skips)}, but the UNet has "
                f"{len(skips)} skips {self._describe(skips)}; build one for this model with CSCTuner.from_unet(unet)"
            )
        self.to(device_of(unet))
        self._handles = [
            unet.register_forward_pre_hook(self._compute_features, with_kwargs=True),
            *hook_skips(unet, skips, self.delta_skip),
        ]

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = None  # they may hold a training step's autograd graph

    @staticmethod
    def _describe(skips: list[Skip]) -> dict[str, str]:
        return {skip.key: f"{skip.channels}{' (downsampled)' if skip.downsampled else ''}" for skip in skips}

    # -- the condition ------------------------------------------------------------------
    def prepare(self, context: CallContext | None) -> None:
        """Check the call's hint once per call (not per step): a float (B, 3, H, W) tensor in [0, 1]."""
        hint = context.hints.get(self.config.condition) if context is not None else None
        if hint is not None and self.scale != 0:
            check_hint(hint)

    def condition_features(self, hint: torch.Tensor) -> dict[str, torch.Tensor]:
        """c_j for every skip key "b.r": the chain's outputs, each of its skip's (B_hint, C, H, W) shape,
        in this tuner's dtype (fp32 master weights under an fp16 UNet)."""
        weight = self.pre_encoder[0].weight
        c = self.pre_encoder(hint.to(weight.device, weight.dtype))  # (B, 3, f h, f w) -> (B, C_pre, h, w)
        features = {}
        for skip, block in zip(reversed(self.skips), self.chain):  # encoder order
            c = block(c)  # (B, C_i, H_i, W_i): half the previous H, W after a downsampler
            features[skip.key] = c
        return features

    def _compute_features(self, unet: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """UNet forward-pre-hook: the condition features of this call, once for all skips, from the call
        context's hint. They stay until the next call, since gradient checkpointing re-runs the up blocks
        during backward."""
        self._features = None
        if self.scale == 0:
            return  # no control: no hint needed, nothing computed
        context = current_context(unet)
        hint = context.hints.get(self.config.condition) if context is not None else None
        if hint is None:
            raise RuntimeError(f"the {self.config.condition!r} CSC-Tuner has no control image in this call: run the "
                               f"UNet inside call_context(unet, ctx) with ctx.hints[{self.config.condition!r}] "
                               "(generate(control=...) does), set its scale to 0, or detach the tuner")
        sample = args[0] if args else kwargs["sample"]  # (B, C, h, w) latents
        f = self.config.vae_scale_factor
        want = (sample.shape[-2] * f, sample.shape[-1] * f)
        if tuple(hint.shape[-2:]) != want:
            raise ValueError(
                f"the {self.config.condition!r} hint is {hint.shape[-1]}x{hint.shape[-2]} pixels but the "
                f"{sample.shape[-1]}x{sample.shape[-2]} latents need {want[1]}x{want[0]} (vae_scale_factor {f}); "
                "prepare the hint at the image size"
            )
        if sample.shape[0] % hint.shape[0]:
            raise ValueError(f"the UNet batch {sample.shape[0]} is not a multiple of the hint batch {hint.shape[0]}; "
                             "pass one hint, or one per image")
        repeats = sample.shape[0] // hint.shape[0]
        # Computed on the hint batch and tiled: under CFG the UNet batch is [uncond; cond], the images twice.
        self._features = {key: c.repeat(repeats, 1, 1, 1) for key, c in self.condition_features(hint).items()}

    def delta_skip(self, key: str, x: torch.Tensor) -> torch.Tensor | None:
        """s h_j = s (T_j(x_j + c_j) + c_j), the term this tuner adds to the skip x_j (adapters/skips.py sums
        every editor's); s = 0 adds nothing, so the base output is reproduced exactly."""
        if self.scale == 0:
            return None
        if self._features is None:
            raise RuntimeError("CSC-Tuner condition features are computed when the UNet runs; call the UNet, "
                               "not its up blocks alone")
        c = self._features[key]  # (B, C, H, W), the shape of x
        h = self.tuners[module_name(key)](x.to(c.dtype) + c) + c
        return self.scale_for(x) * h.to(x.dtype)
