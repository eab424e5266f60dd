"""Tuners as torch modules that attach to an unmodified diffusers UNet (see adapters/base.py).

Importing the method modules (below) registers them: `REGISTRY[name]` is the only name -> class map."""

from .base import REGISTRY, Adapter, detect_family, register, unet_fingerprint
from .csc_tuner import CSCTuner, CSCTunerConfig, attached_csc_tuners
from .io import load_adapter, read_metadata, save_adapter
from .lora import LoRA, LoRAConfig
from .sara import SaRA, SaRAConfig
from .sc_tuner import SCTuner, SCTunerConfig

__all__ = [
    "REGISTRY", "Adapter", "CSCTuner", "CSCTunerConfig", "LoRA", "LoRAConfig", "SCTuner", "SCTunerConfig", "SaRA",
    "SaRAConfig", "attached_csc_tuners", "detect_family", "load_adapter", "read_metadata", "register", "save_adapter",
    "unet_fingerprint",
]
