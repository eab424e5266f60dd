"""Tuners as torch modules that attach to an unmodified diffusers UNet (see adapters/base.py).

Importing the method modules (below) registers them: `REGISTRY[name]` is the only name -> class map.
What is attached to a UNet, and the per-call context pipelines give it, live in adapters/context.py."""

import os

# Same seed, same image: with more than one thread, MKL's matrix products otherwise round differently from run
# to run by the memory alignment of their operands (a grey level in a few pixels of a composition, whose guided
# update differentiates through the UNet). MKL reads this at its first call, so it is set before any model work;
# a value the user exported wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from .base import REGISTRY, Adapter, Recommendation, detect_family, option, register, unet_fingerprint
from .context import CallContext, Region, Row, TextEncoding, attached_adapters, call_context, current_context
from .csc_tuner import CSCTuner, CSCTunerConfig
from .deltas import LoraExport, fuse_deltas, lora_from_deltas
from .fusion import MergedWeights, fused_lora, merge_into
from .io import load_adapter, read_metadata, save_adapter
from .lora import LoRA, LoRAConfig
from .ortho_lora import OrthoLoRA, OrthoLoRAConfig
from .processors import ProcessorSwap, WrappingProcessor
from .sara import SaRA, SaRAConfig
from .sc_tuner import SCTuner, SCTunerConfig
from .spm import SPM, SPMConfig

__all__ = [
    "REGISTRY", "SPM", "Adapter", "CSCTuner", "CSCTunerConfig", "CallContext", "LoRA", "LoRAConfig", "LoraExport",
    "MergedWeights", "OrthoLoRA", "OrthoLoRAConfig", "ProcessorSwap", "Recommendation", "Region", "Row", "SCTuner",
    "SCTunerConfig", "SPMConfig", "SaRA", "SaRAConfig", "TextEncoding", "WrappingProcessor", "attached_adapters",
    "call_context", "current_context", "detect_family", "fuse_deltas", "fused_lora", "load_adapter",
    "lora_from_deltas", "merge_into", "option", "read_metadata", "register", "save_adapter", "unet_fingerprint",
]
