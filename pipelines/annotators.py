"""Annotators: images -> control hints for CSC-Tuners, computed without any downloaded model.

    hint = prepare_hint("photo.png", "canny", (512, 512))      # (1, 3, 512, 512) float32 in [0, 1]
    pairs = build_control_pairs("data/cats", "canny", "data/cats-canny", resolution=512)

A hint is an RGB image in which the condition is drawn; CSC-Tuners read it in [0, 1], never [-1, 1]
(a [-1, 1] hint degrades control without any error: docs/methods.md, CSC-Tuner). Line conditions share one
polarity, **light lines on black**, so that black always means "no information here":

- "canny": cv2.Canny(low=100, high=200) on the grey image (ControlNet's thresholds): white edges on black.
- "sketch": a user drawing, dark strokes on a light background (how people draw; a transparent drawing
  layer is composited on white first). It is inverted to light strokes on black, grey levels kept so that
  anti-aliased strokes stay smooth. A drawing that is already light-on-black goes in with annotate=False.
- "color": the image's coarse palette (T2I-Adapter's colour condition): the mean colour of each cell of
  a grid (`cells` along the longer side; 8 cells make 64-pixel cells at 512), upsampled nearest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from adapters.checks import is_int

from .errors import InputError
from .filetypes import IMAGE_EXTENSIONS
from .images import ImageInput, load_image, write_png


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """White Canny edges on black, RGB, the size of `image` (hysteresis thresholds `low` < `high`)."""
    if not 0 <= low <= high:
        raise InputError(f"canny thresholds low={low!r}, high={high!r}: need 0 <= low <= high (default 100, 200)")
    grey = np.asarray(image.convert("L"))  # (H, W) uint8
    return Image.fromarray(cv2.Canny(grey, low, high)).convert("RGB")


def color_map(image: Image.Image, cells: int = 8) -> Image.Image:
    """The coarse palette of `image`: `cells` cells along the longer side (aspect kept), each the mean
    colour of its pixels (box filter), upsampled nearest to the image's size."""
    if not is_int(cells, 1):
        raise InputError(f"color_map cells={cells!r} must be an integer >= 1 (default 8)")
    image = image.convert("RGB")
    width, height = image.size
    longer = max(width, height)
    grid = (max(1, round(width * cells / longer)), max(1, round(height * cells / longer)))
    return image.resize(grid, Image.Resampling.BOX).resize(image.size, Image.Resampling.NEAREST)


def sketch(image: Image.Image) -> Image.Image:
    """A drawing of dark strokes on a light background -> light strokes on black (inverted grey levels), RGB."""
    return ImageOps.invert(image.convert("L")).convert("RGB")


# condition name -> annotator (a PIL RGB image -> its hint, same size). The names are CSCTunerConfig.condition's.
ANNOTATORS: dict[str, Callable[[Image.Image], Image.Image]] = {"canny": canny, "color": color_map, "sketch": sketch}


def prepare_hint(image: ImageInput, condition: str, size: tuple[int, int], *, annotate: bool = True) -> torch.Tensor:
    """The hint a CSC-Tuner takes: (1, 3, height, width) float32 in [0, 1], for `size` = (width, height).

    `image` is loaded as `load_image` does (any mode, EXIF upright, cover-and-center-crop to `size`), then
    drawn by `ANNOTATORS[condition]` at that size (so Canny's lines are one pixel of the output wide).
    annotate=False takes it as a ready-made hint (an edge map from another tool, or a condition without
    an annotator here, e.g. "depth")."""
    if annotate and condition not in ANNOTATORS:
        raise InputError(f"no annotator for condition {condition!r} (known: {', '.join(ANNOTATORS)}); pass a "
                         "ready-made hint image with annotate=False")
    rgb = load_image(image, size)
    hint = ANNOTATORS[condition](rgb) if annotate else rgb
    return torch.from_numpy(np.array(hint)).permute(2, 0, 1)[None].float() / 255.0  # (H, W, 3) -> (1, 3, H, W)


def training_hints(pixels: torch.Tensor, images: Sequence[Path], condition: str, *, image_dir: str | os.PathLike,
                   hint_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The hints of a training set, uint8 (N, 3, H, W), lined up with `pixels` (the training crops of
    `images`, uint8 (N, 3, H, W)). Without `hint_dir`, the condition's annotator draws each hint on its
    training crop (so lines are one pixel wide at the training resolution, as at inference); with it,
    each image's ready hint (`hint_path_for`, as `build_control_pairs` writes them) is cropped as the image was."""
    size = (pixels.shape[-1], pixels.shape[-2])
    if hint_dir is None:
        if condition not in ANNOTATORS:
            raise InputError(f"condition {condition!r} has no annotator (known: {', '.join(ANNOTATORS)}); give "
                             "hint_dir, a folder of ready-made hints mirroring the training images")
        drawn = [ANNOTATORS[condition](Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels]
    else:
        paths = [hint_path_for(image, image_dir, hint_dir) for image in images]
        missing = [path for path in paths if not path.is_file()]
        if missing:
            raise InputError(f"{len(missing)} of {len(paths)} training images have no hint in {hint_dir} (first "
                             f"missing: {missing[0]}); write them with `studio annotate`, or leave hint_dir unset "
                             "to annotate the images while training")
        drawn = [load_image(path, size) for path in paths]
    return torch.stack([torch.from_numpy(np.array(hint)).permute(2, 0, 1) for hint in drawn])


def hint_path_for(image: str | os.PathLike, image_dir: str | os.PathLike, hint_dir: str | os.PathLike) -> Path:
    """Where `build_control_pairs` writes the hint of `image`: its path relative to `image_dir`, under
    `hint_dir`, as a PNG (`data/10_sks cat/a.jpg` -> `hints/10_sks cat/a.png`)."""
    return Path(hint_dir) / Path(image).relative_to(image_dir).with_suffix(".png")


def build_control_pairs(image_dir: str | os.PathLike, condition: str, out_dir: str | os.PathLike, *,
                        resolution: int | None = None) -> list[tuple[Path, Path]]:
    """Annotate every image of a training folder (subfolders included) into `out_dir`, mirroring the
    layout (`hint_path_for`); returns the (image, hint) pairs in sorted order.

    resolution: crop and resize each image as the training loop does (short side to `resolution`,
    center crop) before annotating, so that hint and image line up pixel for pixel there; None keeps
    each image's size. Each hint is a PNG written atomically, with a `studio` text chunk recording the
    condition. `out_dir` must lie outside `image_dir`: the training scan would take hints for images."""
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    if condition not in ANNOTATORS:
        raise InputError(f"condition={condition!r} has no annotator; use one of {', '.join(ANNOTATORS)}")
    if not image_dir.is_dir():
        raise InputError(f"image_dir={str(image_dir)!r} is not a folder; pass the folder of training images")
    if out_dir.resolve() == image_dir.resolve() or image_dir.resolve() in out_dir.resolve().parents:
        raise InputError(f"out_dir={str(out_dir)!r} lies inside image_dir={str(image_dir)!r}, where the hints "
                         f"would be read as training images; use a sibling folder such as {image_dir}-{condition}")
    if resolution is not None and not is_int(resolution, 8):
        raise InputError(f"resolution={resolution!r} must be an integer >= 8, or None for each image's own size")
    images = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(image_dir).parts))
    if not images:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    pairs = [(image, hint_path_for(image, image_dir, out_dir)) for image in images]
    seen: dict[Path, Path] = {}
    for image, hint in pairs:  # checked before writing anything
        if hint in seen:
            raise InputError(f"{seen[hint].name} and {image.name} would both write {hint}; rename one of them")
        seen[hint] = image

    size = None if resolution is None else (resolution, resolution)
    # Every image decoded before any hint is written, so a corrupt one leaves no half-done folder; decoded again
    # below rather than held, as a control dataset can hold more images than fit in memory.
    for image, _ in pairs:
        load_image(image, size)
    for image, hint in pairs:
        drawn = ANNOTATORS[condition](load_image(image, size))
        info = PngImagePlugin.PngInfo()
        info.add_text("studio", json.dumps({"condition": condition, "source": image.name, "resolution": resolution}))
        write_png(drawn, hint, info)
    return pairs
