"""Tuners as torch modules that attach to an unmodified diffusers UNet (see adapters/base.py)."""

from .base import REGISTRY, Adapter, detect_family, register, unet_fingerprint

__all__ = ["REGISTRY", "Adapter", "detect_family", "register", "unet_fingerprint"]
