"""Input normalisation for real images and user masks (issue 7.6).

Whatever a user uploads (RGBA, grayscale, palette, 16-bit, an EXIF-rotated phone photo, a huge scan)
becomes an RGB image of a stated size, or is refused with a message before any work starts.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from .errors import InputError

# 50 MP admits 48 MP phone photos; decoded as RGB that is already 150 MB. Larger uploads are refused.
DEFAULT_MAX_PIXELS = 50_000_000
# PIL's own decompression-bomb guard (warn above, refuse above twice this) for every other code path
# that opens images (UI uploads, datasets); `load_image` checks its own, possibly smaller, limit first.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

ImageInput = str | os.PathLike | Image.Image
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WHITE = (255, 255, 255)


def load_image(image: ImageInput, size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB image of `size` (width, height) from a path or a PIL image of any mode.

    - The pixel count is checked from the file header, before the pixel data is decoded; more than
      `max_pixels` is refused with an InputError (as are unreadable files).
    - EXIF orientation is applied (`ImageOps.exif_transpose`), so phone photos come out upright.
    - Transparency (RGBA, LA, PA, palette or "transparency" key) is composited on white; 16-bit
      grayscale ("I;16*", and "I" as PIL opens some 16-bit files) is scaled 0..65535 -> 0..255 rather
      than clipped; every other mode goes through PIL's `convert("RGB")`.
    - Resize/crop policy: the image is scaled, aspect ratio kept, until it covers `size` (for a square
      target: the short side matches), then center-cropped to `size` (`ImageOps.fit`, Lanczos). With
      `size=None` it keeps its own size.
    """
    rgb = _to_rgb(_open(image, max_pixels))
    return rgb if size is None else ImageOps.fit(rgb, size, method=Image.Resampling.LANCZOS)


def load_mask(mask: ImageInput | np.ndarray | None, size: tuple[int, int],
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """A binary (height, width) bool mask of `size`, or None when empty, which means "no limit".

    Any mode is accepted. A mask with transparency (a painted layer, as a sketch tool exports it) is
    read from its alpha; an opaque one from its luminance. Inside is > 127, half-way. The geometry is
    the same cover-and-center-crop as `load_image`, with nearest-neighbour sampling so it stays binary
    and lines up with the image it was drawn on (a mask of the target size is unchanged).
    """
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        if mask.dtype not in (np.bool_, np.uint8):
            raise InputError(f"mask dtype={mask.dtype} is not supported: pass a bool or uint8 (0..255) array")
        mask = Image.fromarray(mask.astype(np.uint8) * 255 if mask.dtype == np.bool_ else mask)
    image = _open(mask, max_pixels)
    alpha = image.convert("RGBA").getchannel("A") if image.has_transparency_data else None
    if alpha is not None and alpha.getextrema()[0] < 255:
        grey = alpha
    else:
        grey = _to_rgb(image).convert("L")
    binary = np.asarray(ImageOps.fit(grey, size, method=Image.Resampling.NEAREST)) > 127
    return binary if binary.any() else None


def _open(image: ImageInput, max_pixels: int) -> Image.Image:
    """Open lazily, refuse an oversized image from its header, then apply the EXIF orientation."""
    if not isinstance(image, Image.Image):
        try:
            with warnings.catch_warnings():  # the size is checked below with a clearer message
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(image)  # reads the header only
        except Image.DecompressionBombError as error:
            raise InputError(f"{image!s} is too large to decode safely ({error}): downscale it first") from error
        except (OSError, SyntaxError, ValueError) as error:  # missing, not an image, or a header cut short
            raise InputError(f"{image!s} cannot be opened as an image ({error}): pass a PNG, JPEG or WebP "
                             "file") from error
    width, height = image.size
    if width * height > max_pixels:
        name = getattr(image, "filename", "") or "image"
        raise InputError(
            f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}: "
            "downscale it first or pass a larger max_pixels"
        )
    try:
        return ImageOps.exif_transpose(image)  # decodes the pixels (now known to be of a sane size)
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for truncated or corrupt pixel data
        name = getattr(image, "filename", "") or "image"
        raise InputError(f"{name} cannot be decoded ({error}): the file is truncated or corrupt; re-save it as "
                         "PNG or JPEG") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit grey scaled to 8 bits, transparency composited on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's convert("L") clips 16-bit values at 255; scale instead (65535 / 257 = 255).
        grey = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba)
    return image.convert("RGB")


def check_out_dir(path: str | os.PathLike, name: str = "--out") -> Path:
    """`path` as an output folder, refused before any work when it (or a folder above it) is a file or cannot be
    written to; it is created when the first output is written."""
    path = Path(path).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor or "."))
    if existing.exists() and not existing.is_dir():
        raise InputError(f"{name} {path}: {existing} is a file, not a folder; pass a folder for the outputs "
                         "(it is created if missing)")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{name} {path}: the folder {existing} is not writable; pass a folder you can write to")
    return path


def write_png(image: Image.Image, path: str | os.PathLike, pnginfo: PngImagePlugin.PngInfo | None = None) -> Path:
    """Write a PNG to a temporary file in the same folder and rename it, so a crash never leaves half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=pnginfo)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
