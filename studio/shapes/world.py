"""The Shapes world: a seeded renderer, the caption grammar and scene sampling.

Every value here is fixed: the analyzer and the benchmarks score images against them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

CANVAS = 64
SUPERSAMPLE = 4  # render at 4x and box-downsample: anti-aliased edges are easier for a VAE

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BASE_SHAPES = ("circle", "square", "triangle")
HELD_OUT_SHAPES = ("star", "cross", "ring")
SHAPES = BASE_SHAPES + HELD_OUT_SHAPES
SIZES = {"small": 7, "large": 12}
DEFAULT_HALF_EXTENT = 10
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
MAX_JITTER = 3
OUTLINE_WIDTH = 2  # the held-out "outline" style
PAIRS = (("left", "right"), ("top", "bottom"))  # two-object layouts


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    position: str = "center"
    size: str | None = None  # None = unnamed (half-extent 10 px)
    outline: bool = False

    @property
    def half_extent(self) -> int:
        return SIZES[self.size] if self.size else DEFAULT_HALF_EXTENT


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str = "white"
    jitter: tuple[tuple[int, int], ...] = field(default=())  # per object (dx, dy) in pixels

    def caption(self) -> str:
        return caption(self)


def caption(scene: Scene) -> str:
    """`a [size] <color> <shape>[ on the <position>][ on a <background> background]`,
    two objects: `a <color> <shape> on the <p1> and a <color> <shape> on the <p2>`.
    The held-out outline style is written as the word `outline` before the shape."""

    def noun(o: ShapeObject) -> str:
        words = ["a"] + ([o.size] if o.size else []) + [o.color] + (["outline"] if o.outline else []) + [o.shape]
        return " ".join(words)

    if len(scene.objects) == 2:
        a, b = scene.objects
        text = f"{noun(a)} on the {a.position} and {noun(b)} on the {b.position}"
    else:
        (o,) = scene.objects
        text = noun(o) + ("" if o.position == "center" else f" on the {o.position}")
    if scene.background != "white":
        text += f" on a {scene.background} background"
    return text


def shape_mask(shape: str, cx: float, cy: float, half_extent: float, size: int = CANVAS, outline: bool = False,
               supersample: int = 1) -> np.ndarray:
    """Boolean mask (size*supersample)^2 of one shape centred at (cx, cy) in canvas pixels."""
    n = size * supersample
    # Pixel centres in canvas units: (j + 0.5) / supersample.
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    dx, dy, h = x - cx, y - cy, float(half_extent)
    if shape == "circle":
        mask = dx**2 + dy**2 <= h**2
    elif shape == "square":
        mask = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":  # upright, apex (cx, cy - h), base on y = cy + h
        mask = (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    elif shape == "ring":
        r2 = dx**2 + dy**2
        mask = (r2 <= h**2) & (r2 >= (0.55 * h) ** 2)
    elif shape == "cross":  # plus sign, arm width = 0.8 * half-extent
        arm = 0.4 * h
        mask = ((np.abs(dx) <= arm) & (np.abs(dy) <= h)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= h))
    elif shape == "star":  # five points, apex up, inner radius of a regular star
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, h, h * 0.382)
        poly = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1) * supersample
        canvas = np.zeros((n, n), np.uint8)
        cv2.fillPoly(canvas, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        mask = canvas.astype(bool)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if outline:
        inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
        mask = mask & (inside <= OUTLINE_WIDTH * supersample)
    return mask


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 64x64 RGB image (anti-aliased by supersampling)."""
    n = CANVAS * SUPERSAMPLE
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    jitter = scene.jitter or ((0, 0),) * len(scene.objects)
    for obj, (jx, jy) in zip(scene.objects, jitter):
        cx, cy = POSITIONS[obj.position]
        mask = shape_mask(obj.shape, cx + jx, cy + jy, obj.half_extent, outline=obj.outline, supersample=SUPERSAMPLE)
        img[mask] = COLORS[obj.color]
    small = img.reshape(CANVAS, SUPERSAMPLE, CANVAS, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.round(small).astype(np.uint8), "RGB")


def sample_scene(rng: random.Random, shapes: tuple[str, ...] = BASE_SHAPES, two_object_prob: float = 0.3,
                 outline_prob: float = 0.0, jitter: bool = True) -> Scene:
    """Draw a random scene from the caption grammar (seeded by `rng`)."""
    background = rng.choice(("white", "white", "black", "gray"))  # white is the unnamed default: keep it common
    if rng.random() < two_object_prob:
        p1, p2 = rng.choice(PAIRS)
        objects = tuple(
            ShapeObject(rng.choice(list(COLORS)), rng.choice(shapes), p, None, rng.random() < outline_prob)
            for p in (p1, p2)
        )
        background = "white"  # two-object captions name no background
    else:
        objects = (
            ShapeObject(rng.choice(list(COLORS)), rng.choice(shapes), rng.choice(list(POSITIONS)),
                        rng.choice((None, "small", "large")), rng.random() < outline_prob),
        )
    offsets = tuple(
        (rng.randint(-MAX_JITTER, MAX_JITTER), rng.randint(-MAX_JITTER, MAX_JITTER)) if jitter else (0, 0)
        for _ in objects
    )
    return Scene(objects, background, offsets)
