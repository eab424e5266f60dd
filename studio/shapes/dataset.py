"""Seeded Shapes-world datasets on disk: one PNG and one caption sidecar (`.txt`, same stem) per image.

    studio shapes dataset --out DIR --n 100 --seed 0 [--shapes circle star ...] [--held-out] [--outline-prob 0.2]

The same arguments always write the same bytes. Customization sets of one subject (for example five
renders of an orange star) come from `subject_scenes` / `subject_images`.
"""

from __future__ import annotations

import argparse
import io
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .world import (
    BACKGROUNDS,
    BASE_SHAPES,
    COLORS,
    MAX_JITTER,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    render,
    sample_scene,
)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and `os.replace`, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_scenes(out_dir: str | Path, scenes: Sequence[Scene], caption: str | None = None) -> list[Path]:
    """Render `scenes` to OUT/000000.png ... with a `.txt` caption each (the scene's own unless `caption`
    is given); returns the image paths. Refuses a folder holding other PNG or caption files, which a
    kohya-style loader would mix in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stems = [f"{i:06d}" for i in range(len(scenes))]
    ours = {f"{stem}{ext}" for stem in stems for ext in (".png", ".txt")}
    foreign = sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".txt") and p.name not in ours)
    if foreign:
        raise FileExistsError(f"{out} already holds {len(foreign)} other image/caption files (e.g. {foreign[0]}); "
                              "use an empty folder")
    paths = []
    for stem, scene in zip(stems, scenes):
        buf = io.BytesIO()
        render(scene).save(buf, format="PNG")
        write_atomic(out / f"{stem}.png", buf.getvalue())
        write_atomic(out / f"{stem}.txt", (caption or scene.caption()).encode())
        paths.append(out / f"{stem}.png")
    return paths


def build_dataset(out_dir: str | Path, n: int, seed: int, shapes: tuple[str, ...] = BASE_SHAPES,
                  two_object_prob: float = 0.3, outline_prob: float = 0.0) -> list[Path]:
    """n seeded random scenes of the caption grammar (base shapes, filled, by default) written to `out_dir`."""
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        raise ValueError(f"shapes {sorted(unknown)} are not world shapes {SHAPES}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    scenes = [sample_scene(rng, shapes, two_object_prob, outline_prob) for _ in range(n)]
    return write_scenes(out_dir, scenes)


def subject_scenes(color: str, shape: str, n: int, seed: int, outline: bool = False,
                   backgrounds: Sequence[str] = ("white",), positions: Sequence[str] = tuple(POSITIONS),
                   sizes: Sequence[str | None] = (None, "small", "large")) -> list[Scene]:
    """n single-object scenes of one subject, cycling through shuffled backgrounds, positions and sizes so
    that even a handful of images varies in all of them (5 renders cover the 5 positions)."""
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown subject {color!r} {shape!r}; colours {tuple(COLORS)}, shapes {SHAPES}")
    for name, values, known in (("backgrounds", backgrounds, BACKGROUNDS), ("positions", positions, POSITIONS),
                                ("sizes", sizes, {None, *SIZES})):
        if not values or set(values) - set(known):
            raise ValueError(f"{name} must be a non-empty subset of {tuple(known)}, got {tuple(values)}")
    rng = random.Random(seed)
    backgrounds, positions, sizes = (rng.sample(list(v), len(v)) for v in (backgrounds, positions, sizes))
    scenes = []
    for i in range(n):
        obj = ShapeObject(color, shape, positions[i % len(positions)], sizes[i % len(sizes)], outline)
        jitter = (rng.randint(-MAX_JITTER, MAX_JITTER), rng.randint(-MAX_JITTER, MAX_JITTER))
        scenes.append(Scene((obj,), backgrounds[i % len(backgrounds)], (jitter,)))
    return scenes


def render_subject(color: str, shape: str, n: int, seed: int, **variety: Any) -> list[Image.Image]:
    """n renders of one subject; `variety` is `subject_scenes`' outline/backgrounds/positions/sizes."""
    return [render(s) for s in subject_scenes(color, shape, n, seed, **variety)]


def subject_images(out_dir: str | Path, color: str, shape: str, n: int, seed: int, caption: str | None = None,
                   **variety: Any) -> list[Path]:
    """Write a customization set of one subject; `caption` (e.g. "a sks star") replaces the world captions."""
    return write_scenes(out_dir, subject_scenes(color, shape, n, seed, **variety), caption)


def main(argv: list[str] | None = None) -> None:
    """`studio shapes dataset`: argv is what follows those words. A bad value raises `StudioError` (the
    `studio` command prints it as one `error: ...` line and exits 2); argparse refuses unknown options,
    non-numbers and unknown shapes itself."""
    from pipelines.errors import StudioError  # here: building a dataset needs nothing else of pipelines

    p = argparse.ArgumentParser(prog="studio shapes dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for NNNNNN.png + NNNNNN.txt")
    p.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and arguments write the same files (default 0)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--shapes", nargs="+", choices=SHAPES, metavar="SHAPE",
                       help=f"the shapes scenes draw from, of {', '.join(SHAPES)} "
                            f"(default: the base shapes {', '.join(BASE_SHAPES)})")
    which.add_argument("--held-out", action="store_true",
                       help="draw from every shape, held-out ones included (as --shapes with all of them)")
    p.add_argument("--two-object-prob", type=float, default=0.3, help="share of two-object scenes (default 0.3)")
    p.add_argument("--outline-prob", type=float, default=0.0,
                   help="share of objects in the held-out outline style (default 0)")
    args = p.parse_args(argv)
    if args.n < 1:
        raise StudioError(f"--n {args.n}: the number of images must be at least 1")
    for option, value in (("--two-object-prob", args.two_object_prob), ("--outline-prob", args.outline_prob)):
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise StudioError(f"{option} {value}: a share must lie in [0, 1]")
    if args.out.exists() and not args.out.is_dir():
        raise StudioError(f"--out {args.out} is a file; pass a new or empty folder")
    shapes = SHAPES if args.held_out else tuple(dict.fromkeys(args.shapes or BASE_SHAPES))
    try:
        paths = build_dataset(args.out, args.n, args.seed, shapes, args.two_object_prob, args.outline_prob)
    except FileExistsError as e:  # the folder holds other images or captions (the message says so)
        raise StudioError(str(e)) from e
    print(f"wrote {len(paths)} images with captions to {args.out}")
