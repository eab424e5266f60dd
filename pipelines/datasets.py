"""Training sets from image folders: captions, kohya repeat folders, prior-preservation class images.

One folder may mix these layouts (those of kohya's sd-scripts and of Hugging Face's imagefolder):

    data/
      a.png   a.txt            sidecar caption (.txt, as the GUIs write it, or .caption, sd-scripts' default)
      b.jpg   b.caption
      c.webp                   no sidecar: metadata.jsonl's caption, else the trigger word
      metadata.jsonl           Hugging Face imagefolder: {"file_name": "c.webp", "text": "..."} per line
      10_sks star/             kohya repeat folder: each image counts 10 times per epoch, and images
        d.png                  without a caption get the folder's "sks star"

Masked loss (TrainConfig.masked_loss, kohya's --masked_loss) learns only part of each image: the part its mask
keeps, read from a mask image of the same name in a mask folder (white: learn, black: ignore), else from the
image's own transparency (kohya's alpha_mask).

Everything is checked before any work starts: a missing folder, no images, an unreadable image or
an image without a caption raises `DatasetError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import StudioError
from .filetypes import IMAGE_EXTENSIONS

CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_FILE = "metadata.jsonl"
METADATA_CAPTION_KEYS = ("text", "caption")  # the imagefolder column diffusers' scripts read, then the other usual one
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: "<repeats>_<token> <class>"


class DatasetError(StudioError):
    """A training folder that cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class Example:
    """One training image, its caption, and how many times it counts per epoch."""

    image: Path
    caption: str
    repeats: int = 1


def scan_folder(folder: str | os.PathLike, *, fallback_caption: str | None = None) -> list[Example]:
    """Every image in `folder` and in its kohya `N_name` subfolders, with its caption.

    A caption comes from, in order: the image's sidecar file, `metadata.jsonl` in the image's
    folder, the repeat folder's name, `fallback_caption` (the trigger word). Images are listed in
    sorted order, top folder first, so the result (and the data order built on it) never depends
    on the file system's listing order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"training folder {folder} does not exist; pass the folder that holds the training images")
    examples = _scan_one(folder, repeats=1, fallback_caption=fallback_caption)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.match(sub.name)
        if match is None:
            if images_in(sub):
                raise DatasetError(
                    f"{sub} holds images but its name is not a kohya repeat folder; rename it to "
                    f"'<repeats>_<token> <class>' (e.g. '10_sks star') or move its images into {folder}"
                )
            continue
        repeats = int(match[1])
        if repeats < 1:
            raise DatasetError(f"{sub}: 0 repeats would never show its images; use at least 1 (e.g. '1_{match[2]}')")
        examples += _scan_one(sub, repeats=repeats, fallback_caption=match[2])
    if not examples:
        raise DatasetError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}; add images or pass the folder holding them"
        )
    return examples


def _scan_one(folder: Path, repeats: int, fallback_caption: str | None) -> list[Example]:
    metadata = _read_metadata(folder)
    return [Example(image, _caption(image, metadata, fallback_caption), repeats) for image in images_in(folder)]


def images_in(folder: Path) -> list[Path]:
    """The images directly in `folder`, by extension, in sorted order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_metadata(folder: Path) -> dict[Path, str]:
    """`metadata.jsonl` (Hugging Face imagefolder) as {image path: caption}; {} when there is none."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} line {number} is not valid JSON ({e.msg}); fix or delete that line") from e
        key = next((k for k in METADATA_CAPTION_KEYS if k in row), None)
        if "file_name" not in row or key is None:
            raise DatasetError(
                f"{path} line {number} needs a 'file_name' and a caption ('text' or 'caption'); got keys {sorted(row)}"
            )
        image = folder / row["file_name"]
        if not image.is_file():
            raise DatasetError(f"{path} line {number} names {image}, which does not exist; fix the name or drop it")
        captions[image] = str(row[key]).strip()
    return captions


def _read_text(path: Path) -> str:
    """A caption or metadata file as text; one that is not UTF-8 (a Windows-1252 export...) is named with the fix."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 "
                           "(e.g. `iconv -f cp1252 -t utf-8`)") from e


def _caption(image: Path, metadata: dict[Path, str], fallback_caption: str | None) -> str:
    sidecars = [image.with_suffix(ext) for ext in CAPTION_EXTENSIONS if image.with_suffix(ext).is_file()]
    if len(sidecars) > 1:
        raise DatasetError(f"{image} has two captions ({', '.join(p.name for p in sidecars)}); keep only one")
    if sidecars:
        caption = _read_text(sidecars[0]).strip()
        if not caption:
            raise DatasetError(f"{sidecars[0]} is empty; write the caption in it, or delete it to use the trigger word")
        return caption
    if image in metadata:
        return metadata[image]
    if fallback_caption:
        return fallback_caption
    raise DatasetError(
        f"{image} has no caption: add {image.stem}.txt next to it, or set a trigger word to caption every image "
        "that has none"
    )


def load_images(examples: Sequence[Example], resolution: int) -> torch.Tensor:
    """The examples' images as uint8 (N, 3, resolution, resolution): the shorter side resized to
    `resolution` (bicubic), then center-cropped, as SD's training data was prepared."""
    pixels = torch.empty(len(examples), 3, resolution, resolution, dtype=torch.uint8)
    for i, example in enumerate(examples):
        pixels[i] = torch.from_numpy(np.array(_read_image(example.image, resolution))).permute(2, 0, 1)
    return pixels


def load_masks(examples: Sequence[Example], resolution: int, mask_dir: Path | None = None) -> torch.Tensor:
    """Each example's loss mask as float (N, 1, resolution, resolution) in [0, 1], cropped as its image: the
    image of the same name in `mask_dir` (any image type; white: learn, black: ignore), else the image's own
    alpha channel. Images without a mask (all named at once), or whose mask keeps nothing, are refused."""
    masks = torch.zeros(len(examples), 1, resolution, resolution)
    unmasked = []
    by_stem: dict[str, list[Path]] = {}  # the mask folder, listed once
    for path in images_in(mask_dir) if mask_dir is not None else []:
        by_stem.setdefault(path.stem, []).append(path)
    for i, example in enumerate(examples):
        found = by_stem.get(example.image.stem, [])
        if len(found) > 1:
            raise DatasetError(f"{example.image.name} has two masks in {mask_dir} ({', '.join(p.name for p in found)})"
                               "; keep only one")
        if found:
            mask = _read_image(found[0], resolution, mode="L")
        elif _has_alpha(example.image):
            mask = _read_image(example.image, resolution, mode="RGBA").getchannel("A")
        else:
            unmasked.append(example.image)
            continue
        masks[i, 0] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)
        if not masks[i].any():
            raise DatasetError(f"the mask of {example.image} keeps nothing (all black or fully transparent); "
                               "mark the part to learn in white (or opaque), or drop the image")
    if unmasked:
        where = f"no mask of the same name in {mask_dir} and " if mask_dir is not None else ""
        raise DatasetError(f"{', '.join(map(str, unmasked))} {'have' if len(unmasked) > 1 else 'has'} {where}no "
                           "transparency to mask the loss with; save them as PNGs whose transparent pixels are the "
                           "part to ignore, put a mask of the same name in the mask folder, or turn masked loss off")
    return masks


def _has_alpha(path: Path) -> bool:
    with Image.open(path) as image:  # readable: load_images read it before
        return "A" in image.getbands() or "transparency" in image.info


def _read_image(path: Path, resolution: int, mode: str = "RGB") -> Image.Image:
    try:
        with Image.open(path) as image:
            # Phones store rotation in EXIF; without the transpose a portrait photo trains sideways.
            image = ImageOps.exif_transpose(image).convert(mode)
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for unknown, truncated or corrupt files
        raise DatasetError(f"cannot read image {path} ({e}); re-save it as PNG or JPEG, or delete it") from e
    return ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC, centering=(0.5, 0.5))


class EpochSampler:
    """An endless stream of example indices: each example `repeats` times per epoch, reshuffled
    every epoch (kohya's epoch semantics).

    Position p of the stream is a pure function of (seed, stream, p), so resuming needs only the
    position, and every process of a multi-GPU run computes the same stream without talking."""

    def __init__(self, repeats: Sequence[int], seed: int, stream: int = 0):
        self.pool = np.repeat(np.arange(len(repeats)), repeats)
        self.seed, self.stream = seed, stream
        self._epoch, self._order = -1, self.pool

    def take(self, start: int, count: int) -> torch.Tensor:
        """Indices at stream positions start, ..., start + count - 1."""
        out = torch.empty(count, dtype=torch.long)
        for k, position in enumerate(range(start, start + count)):
            epoch, i = divmod(position, len(self.pool))
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng((self.seed, self.stream, epoch)).permutation(self.pool)
            out[k] = int(self._order[i])
        return out
