"""The analyzer: a deterministic reading of a Shapes-world image, the scorer every benchmark uses.

    analysis = analyze(image)            # background + objects (colour, shape, position, size, outline, mask)
    score_scene(image, scene)            # {"color": True, ..., "count": True, "all": True}

Method: the background is the dominant border colour; objects are 8-connected components of pixels far
from it; each object's colour is the robust colour of its core; its coverage ("alpha") is then fitted by
soft IoU against every world shape (filled and outline) at the world's three sizes, rendered by
`world.shape_mask` so the geometry is exactly the renderer's.

Images of another size are resized to 64x64 with cv2.INTER_AREA (when shrinking, the renderer's own box
filter), squashing a non-square image.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from PIL import Image

from .world import (
    BACKGROUNDS,
    CANVAS,
    COLORS,
    DEFAULT_HALF_EXTENT,
    POSITIONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    Scene,
    ShapeObject,
    shape_mask,
)

ATTRIBUTES = ("color", "shape", "position", "size", "outline", "background")
# Lowest-contrast pair is purple on gray (95 apart): 40 starts an object at ~0.4 coverage for every pair.
FOREGROUND_DISTANCE = 40.0
DETECTION_BLUR = 0.7  # Gaussian sigma, pixels
MIN_AREA = 12  # smaller components are noise specks; the smallest world object covers ~57 px
BORDER = 2  # width of the frame that votes for the background
WINDOW = 40  # template window: the largest object (24 px) plus room for a misplaced fit
HALF_EXTENT_TO_SIZE = {DEFAULT_HALF_EXTENT: None, **{h: name for name, h in SIZES.items()}}

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], np.float32)
_BACKGROUND_NAMES = list(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES], np.float32)


@dataclass(frozen=True, eq=False)
class DetectedObject:
    color: str
    shape: str
    position: str
    size: str | None  # world size name; None = the unnamed 10 px half-extent
    outline: bool
    area: int  # pixels in `mask`
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of `mask`, x1/y1 exclusive (a PIL box)
    centroid: tuple[float, float]  # x, y of `mask` in canvas units (pixel j spans [j, j+1])
    center: tuple[float, float]  # x, y of the fitted shape's centre (what `position` is read from)
    fit: float  # soft IoU of the best-fitting shape: how shape-like the object is (1.0 on clean renders)
    rgb: tuple[float, float, float]  # measured colour of the object's core
    mask: np.ndarray  # bool (64, 64): pixels at least half covered by the object


@dataclass(frozen=True, eq=False)
class Analysis:
    background: str
    objects: list[DetectedObject]  # largest first


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A float32 (64, 64, 3) array of 0..255 values from a PIL image or an HxWx3 array of any size."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got an array of shape {arr.shape}")
    if arr.shape[:2] != (CANVAS, CANVAS):
        arr = cv2.resize(arr, (CANVAS, CANVAS), interpolation=cv2.INTER_AREA)
    return arr


def analyze(image: Image.Image | np.ndarray) -> Analysis:
    """Read the background and the objects of a Shapes-world image."""
    img = to_rgb_array(image)
    background, bg_rgb = _background(img)
    distance = np.linalg.norm(img - bg_rgb, axis=2)
    # Detect on a lightly smoothed image: pixel noise then rarely crosses the threshold, while a 2-px outline
    # still does.
    smooth = np.linalg.norm(cv2.GaussianBlur(img, (0, 0), DETECTION_BLUR) - bg_rgb, axis=2)
    foreground = smooth > FOREGROUND_DISTANCE
    # Label a 1-px dilation so that an outline broken by anti-aliasing stays one object and each label also
    # holds the faint edge pixels below the threshold; world objects are at least 5 px apart.
    grown = cv2.dilate(foreground.astype(np.uint8), np.ones((3, 3), np.uint8))
    count, labels = cv2.connectedComponents(grown, connectivity=8)
    objects = []
    for k in range(1, count):
        region = labels == k
        if np.count_nonzero(foreground & region) < MIN_AREA:
            continue
        obj = _read_object(img, bg_rgb, distance, foreground & region, region)
        if obj is not None:
            objects.append(obj)
    objects.sort(key=lambda o: -o.area)
    return Analysis(background, objects)


def _background(img: np.ndarray) -> tuple[str, np.ndarray]:
    """Majority vote of the border pixels; the measured colour (median of the voters) is the reference."""
    frame = np.ones((CANVAS, CANVAS), bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    border = img[frame]
    nearest = np.argmin(np.linalg.norm(border[:, None] - _BACKGROUND_RGB[None], axis=2), axis=1)
    winner = int(np.bincount(nearest, minlength=len(_BACKGROUND_NAMES)).argmax())
    return _BACKGROUND_NAMES[winner], np.median(border[nearest == winner], axis=0)


def _read_object(img: np.ndarray, bg_rgb: np.ndarray, distance: np.ndarray, pixels: np.ndarray,
                 region: np.ndarray) -> DetectedObject | None:
    # Colour from the core: anti-aliased edges are blends with the background, so keep the pixels nearly as
    # far from it as the component gets (90th percentile, not the max, against noisy outliers).
    far = distance[pixels]
    core = pixels & (distance >= 0.85 * np.percentile(far, 90))
    rgb = np.median(img[core], axis=0)
    step = rgb - bg_rgb
    if np.linalg.norm(step) < FOREGROUND_DISTANCE:  # far pixels of no common colour: a cluster of noise
        return None
    color = _nearest_color(rgb, bg_rgb)

    # Coverage: each pixel as a blend of the background and the object colour, projected on their difference.
    alpha = np.clip((img - bg_rgb) @ step / float(step @ step), 0.0, 1.0) * region
    mask = alpha >= 0.5
    area = int(mask.sum())
    if area < MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    shape, outline, half_extent, center, fit = _fit_shape(alpha)
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - center[0]) ** 2 + (POSITIONS[p][1] - center[1]) ** 2)
    return DetectedObject(
        color=color, shape=shape, position=position, size=HALF_EXTENT_TO_SIZE[half_extent], outline=outline,
        area=area, bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        centroid=(float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), center=center, fit=fit,
        rgb=tuple(float(v) for v in rgb), mask=mask,
    )


def _nearest_color(rgb: np.ndarray, bg_rgb: np.ndarray) -> str:
    """The palette colour whose blend line with the background passes nearest `rgb`: a blurred or thin object
    never reaches its full colour, but stays on the segment between the background and it."""
    step = _PALETTE - bg_rgb  # (colours, 3)
    a = np.clip((step @ (rgb - bg_rgb)) / (step * step).sum(axis=1), 0.0, 1.0)
    residual = np.linalg.norm(rgb - bg_rgb - a[:, None] * step, axis=1)
    return _PALETTE_NAMES[int(np.argmin(residual))]


def _fit_shape(alpha: np.ndarray) -> tuple[str, bool, int, tuple[float, float], float]:
    """Best (shape, outline, half-extent, centre, soft IoU) over every world shape, style and size.

    Each candidate is placed so that its centroid falls on the object's coverage centroid (a triangle's
    centroid sits h/3 below its centre), to the renderer's quarter-pixel grid.
    """
    total = float(alpha.sum())
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5
    mx, my = float((alpha * xs).sum()) / total, float((alpha * ys).sum()) / total
    padded = np.pad(alpha, WINDOW)
    best = ("circle", False, DEFAULT_HALF_EXTENT, (mx, my), -1.0)
    for shape, outline, h in itertools.product(SHAPES, (False, True), sorted(HALF_EXTENT_TO_SIZE)):
        ox, oy = _centroid_offset(shape, outline, h)
        (ix, qx), (iy, qy) = (divmod(round(v * SUPERSAMPLE), SUPERSAMPLE) for v in (mx - ox, my - oy))
        template = _template(shape, outline, h, qx, qy)
        # Window origin in canvas pixels is (ix, iy) - WINDOW/2; the padding shifts it by WINDOW.
        x0, y0 = ix + WINDOW // 2, iy + WINDOW // 2
        crop = padded[y0:y0 + WINDOW, x0:x0 + WINDOW]
        inter = float(np.minimum(crop, template).sum())
        # Union over the whole object, so coverage outside the window still counts against the fit.
        iou = inter / (total + float(template.sum()) - inter)
        if iou > best[4]:  # strict: on a tie (a small ring is its own outline) the filled style wins
            best = (shape, outline, h, (ix + qx / SUPERSAMPLE, iy + qy / SUPERSAMPLE), iou)
    return best


@cache
def _template(shape: str, outline: bool, half_extent: int, qx: int, qy: int) -> np.ndarray:
    """Coverage (WINDOW, WINDOW) of a shape centred at the window centre plus (qx, qy) quarter pixels."""
    c = WINDOW / 2
    m = shape_mask(shape, c + qx / SUPERSAMPLE, c + qy / SUPERSAMPLE, half_extent, size=WINDOW, outline=outline,
                   supersample=SUPERSAMPLE)
    coverage = m.reshape(WINDOW, SUPERSAMPLE, WINDOW, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)
    coverage.flags.writeable = False  # shared through the cache
    return coverage


@cache
def _centroid_offset(shape: str, outline: bool, half_extent: int) -> tuple[float, float]:
    """Centroid minus centre of a shape, in pixels."""
    t = _template(shape, outline, half_extent, 0, 0)
    ys, xs = np.mgrid[0:WINDOW, 0:WINDOW] + 0.5
    return float((t * xs).sum() / t.sum()) - WINDOW / 2, float((t * ys).sum() / t.sum()) - WINDOW / 2


@cache
def outline_visible(shape: str, half_extent: int) -> bool:
    """Whether the outline style changes a shape's render: a small ring (3.15 px thick) is its own outline."""
    return not np.array_equal(_template(shape, False, half_extent, 0, 0), _template(shape, True, half_extent, 0, 0))


def matches(analysis: Analysis, expected: Scene | ShapeObject | Sequence[ShapeObject],
            attributes: Sequence[str] = ("color", "shape", "position")) -> dict[str, bool]:
    """Compare an analysis with the expected objects: {attribute: right on every object, "count", "all"}.

    Expected objects are paired with the largest detections, as many as expected, in the pairing that puts
    each detection nearest its expected position. "count" says whether exactly that many objects were found
    and is not part of "all" (which is every attribute right on every expected object). An outline the world
    cannot show (see `outline_visible`) is right either way. A bare object or list expects a white background.
    """
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; expected some of {ATTRIBUTES}")
    if isinstance(expected, ShapeObject):
        expected = [expected]
    scene = expected if isinstance(expected, Scene) else Scene(tuple(expected))
    want = list(scene.objects)
    got: list[DetectedObject | None] = list(analysis.objects[: len(want)])
    got += [None] * (len(want) - len(got))

    def cost(pairing: tuple[DetectedObject | None, ...]) -> float:
        return sum(
            np.hypot(d.center[0] - POSITIONS[o.position][0], d.center[1] - POSITIONS[o.position][1])
            if d is not None else 0.0
            for o, d in zip(want, pairing)
        )

    pairs = list(zip(want, min(itertools.permutations(got), key=cost)))
    result = {}
    for attr in attributes:
        if attr == "background":
            result[attr] = analysis.background == scene.background
        else:
            result[attr] = all(d is not None and _attribute_ok(o, d, attr) for o, d in pairs)
    result["count"] = len(analysis.objects) == len(want)
    result["all"] = all(result[a] for a in attributes) and all(d is not None for _, d in pairs)
    return result


def _attribute_ok(want: ShapeObject, got: DetectedObject, attr: str) -> bool:
    if attr == "outline" and not outline_visible(want.shape, want.half_extent):
        return True
    return getattr(want, attr) == getattr(got, attr)


def score_scene(image: Image.Image | np.ndarray, scene: Scene | ShapeObject | Sequence[ShapeObject],
                attributes: Sequence[str] = ATTRIBUTES) -> dict[str, bool]:
    """`matches(analyze(image), scene, attributes)`; by default every attribute, background included."""
    return matches(analyze(image), scene, attributes)
