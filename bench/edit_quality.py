"""Editing quality on the Shapes world: UAM's `edit` side by side with the same edit without the uniform branch.

    python bench/edit_quality.py [--n 60] [--steps 50] [--model assets/shapes-sd] [--save DIR]

Cases: N rendered (not generated) single-object scenes, seeded: a random colour, base shape, position, size,
background and jitter. Kinds alternate colour, shape, background edit (N = 60: 20 each); an edit changes that
one attribute of the caption (source caption -> target caption). Each case is edited by `edit` (its
defaults: docs/methods.md, UAM) and by `edit_without_uniform` (DDIM inversion with the source prompt, then
the target prompt: no auxiliary branch, no mask), both at CFG 7.5, and scored by the analyzer:

- edit success: the target attribute is read, and the other two of colour/shape/background are kept;
- position kept: the analyzer's position of the largest object equals the one on the source render;
- background PSNR (colour and shape edits): edited vs source outside the object, i.e. outside the union of the
  analyzer's object masks on the source render and on the target scene's render (a new shape covers other
  pixels), dilated by 2 px. The VAE's reconstruction of the source over the same pixels is the ceiling; the
  target scene's render through the VAE (a perfect edit, as the VAE decodes it) is printed beside it. Reported
  again beyond one latent cell (vae_scale_factor px): a latent edit changes whole cells and the decoder spreads
  each over its neighbours, so the 2-px ring is partly the edit's own (a blurred object edge counts against it);
- object PSNR (background edits, whose background should change, so they have no background PSNR): edited vs
  source inside the source object's mask eroded by 2 px (its edge pixels blend with the new background).

Cost: seconds and UNet row-evaluations per edit against one plain generation (DDIM, same steps and CFG: 2 rows
a step); "cached" edits the same image again with a second target, reusing the inversion. Reconstruction
PSNR without an edit, whole image: the VAE alone (the ceiling), DDIM inversion with "" (no CFG), DDIM inversion
with the source prompt reconstructed at CFG 7.5, and UAM's uniform branch (`reconstruct`).

Targets (issue #7, background re-sized by issue #20 to the paper's own margin): edit success >= 80 %; position
kept >= 90 %; background PSNR beyond one latent cell within 2 dB of the VAE ceiling and >= 0.8 dB above the edit
without the uniform branch (UAM's gain on PIE-Bench); edit cost <= 3.5x a generation (<= 2.5x cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from pipelines import generate, load_model
from pipelines.edit import (
    INVERSION_CACHE,
    ddim_reconstruct,
    decode_latents,
    edit,
    edit_without_uniform,
    encode_image,
    invert,
    reconstruct,
)
from studio.shapes.analyzer import Analysis, analyze, matches
from studio.shapes.world import (
    BACKGROUNDS,
    BASE_SHAPES,
    CANVAS,
    COLORS,
    MAX_JITTER,
    POSITIONS,
    Scene,
    ShapeObject,
    render,
)

GUIDANCE = 7.5  # CFG of every guided branch and of the reference generation
KINDS = ("color", "shape", "background")
VALUES = {"color": tuple(COLORS), "shape": BASE_SHAPES, "background": tuple(BACKGROUNDS)}


def square(radius: int) -> np.ndarray:
    """The structuring element that grows a mask by `radius` px each way."""
    return np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)


MARGIN = square(2)  # 2 px each way: the dilation (and erosion) of the object masks


@dataclass(frozen=True)
class Case:
    kind: str  # the attribute the edit changes: "color", "shape" or "background"
    source: Scene
    target: Scene  # scored
    second: Scene  # another target for the same image: times the edit with a cached inversion


def cases(n: int, seed: int = 2024) -> list[Case]:
    """n seeded cases, kinds alternating, so any n is balanced and a smaller n is a prefix of a larger one."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        obj = ShapeObject(rng.choice(list(COLORS)), rng.choice(BASE_SHAPES), rng.choice(list(POSITIONS)),
                          rng.choice((None, "small", "large")))
        jitter = ((rng.randint(-MAX_JITTER, MAX_JITTER), rng.randint(-MAX_JITTER, MAX_JITTER)),)
        source = Scene((obj,), rng.choice(list(BACKGROUNDS)), jitter)
        current = source.background if kind == "background" else getattr(obj, kind)
        first, second = rng.sample([v for v in VALUES[kind] if v != current], 2)
        out.append(Case(kind, source, changed(source, kind, first), changed(source, kind, second)))
    return out


def changed(scene: Scene, kind: str, value: str) -> Scene:
    """`scene` with its background, or its one object's colour or shape, set to `value`."""
    if kind == "background":
        return dataclasses.replace(scene, background=value)
    (obj,) = scene.objects
    return dataclasses.replace(scene, objects=(dataclasses.replace(obj, **{kind: value}),))


def psnr(a: Image.Image, b: Image.Image, region: np.ndarray | None = None) -> float:
    """PSNR in dB of two RGB images (0..255) over the pixels where `region` is True (all when None)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if region is not None:
        x, y = x[region], y[region]
    mse = float(((x - y) ** 2).mean()) / 255**2
    return 10 * math.log10(1 / max(mse, 1e-10))


def objects_mask(analysis: Analysis) -> np.ndarray:
    """Union of the analyzer's object masks, bool (64, 64)."""
    return np.logical_or.reduce([o.mask for o in analysis.objects] + [np.zeros((CANVAS, CANVAS), bool)])


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def machine(device: torch.device) -> str:
    """CPU model, cores, torch threads and load: the context absolute times need."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    if device.type == "cuda":
        cpu += f"; GPU {torch.cuda.get_device_name(device)}"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{load}, device {device}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60, help="rendered images, kinds alternating (default 60: 20 each)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of every inversion, edit and generation")
    default_q = inspect.signature(edit).parameters["quantile"].default
    p.add_argument("--quantile", type=float, default=default_q, help=f"UAM's mask quantile (default {default_q}, "
                   "edit()'s)")
    default_dilation = inspect.signature(edit).parameters["dilation"].default
    p.add_argument("--dilation", type=int, default=default_dilation,
                   help=f"UAM's mask dilation radius in latent cells (default {default_dilation}, edit()'s)")
    default_mask_start = inspect.signature(edit).parameters["mask_start_t"].default
    p.add_argument("--mask-start", type=int, default=default_mask_start,
                   help=f"UAM's T_mask: blend on 0 < t < T_mask (default {default_mask_start}, edit()'s)")
    default_mode = inspect.signature(edit).parameters["threshold_mode"].default
    p.add_argument("--threshold-mode", choices=["reference", "paper"], default=default_mode,
                   help=f"UAM's mask threshold (default {default_mode!r}, edit()'s; docs/methods.md, UAM)")
    default_floor = inspect.signature(edit).parameters["mask_floor"].default
    p.add_argument("--mask-floor", type=float, default=default_floor,
                   help=f"UAM's mask floor: |Δ| up to it is never an edit (default {default_floor}, edit()'s)")
    p.add_argument("--case-seed", type=int, default=2024,
                   help="seed of the rendered cases (default 2024; another seed gives a held-out set on which to "
                        "check a setting chosen on the default one)")
    p.add_argument("--model", default=None, help="model source (default: the embedded Shapes model)")
    p.add_argument("--save", type=Path, default=None,
                   help="also write one strip per case: source | UAM edit | no-uniform edit | UAM reconstruction")
    args = p.parse_args()
    if args.n < 1 or args.steps < 1:
        p.error("--n and --steps must be positive")

    model = load_model(args.model)
    pipe = model.pipe
    if pipe.unet.config.sample_size * pipe.vae_scale_factor != CANVAS:
        p.error(f"{model.name} does not work at {CANVAS}x{CANVAS}: pass a Shapes-world model")
    steps = args.steps
    todo = cases(args.n, args.case_seed)
    print(f"machine: {machine(pipe.device)}")
    print(f"model {model.name} (hash {model.hash}); {len(todo)} rendered images (case seed {args.case_seed}) "
          f"({', '.join(f'{sum(c.kind == k for c in todo)} {k}' for k in KINDS)} edits), {steps} DDIM steps, "
          f"CFG {GUIDANCE}, UAM mask quantile {args.quantile}, dilation {args.dilation}, T_mask {args.mask_start}, "
          f"threshold {args.threshold_mode}, mask floor {args.mask_floor}")
    # Warm-up: the first calls pay one-off allocation and kernel selection, which no edit should be charged.
    generate(model, "a red circle", num_inference_steps=2, seed=0)
    edit(model, render(todo[0].source), "", "", num_inference_steps=2, use_cache=False)

    rec: dict[str, list[float]] = {}  # metric -> one value per case where it applies

    def add(key: str, value: float) -> None:
        rec.setdefault(key, []).append(value)

    uam_settings = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, quantile=args.quantile,
                        dilation=args.dilation, mask_start_t=args.mask_start, threshold_mode=args.threshold_mode,
                        mask_floor=args.mask_floor)
    t0 = time.perf_counter()
    for i, case in enumerate(todo):
        image, source, target = render(case.source), case.source.caption(), case.target.caption()
        source_analysis = analyze(image)
        INVERSION_CACHE.clear()  # the first edit of each image pays for its inversion

        uam, seconds = timed(edit, model, image, source, target, **uam_settings)
        add("uam time", seconds)
        add("uam rows", uam.unet_rows)
        again, seconds = timed(edit, model, image, source, case.second.caption(), **uam_settings)
        add("cached time", seconds)
        add("cached rows", again.unet_rows)
        plain, seconds = timed(edit_without_uniform, model, image, source, target, num_inference_steps=steps,
                               guidance_scale=GUIDANCE)
        add("plain time", seconds)
        add("plain rows", plain.unet_rows)
        _, seconds = timed(generate, model, target, num_inference_steps=steps, guidance_scale=GUIDANCE, seed=i,
                           scheduler="DDIM")
        add("generation time", seconds)

        with torch.no_grad():
            vae = decode_latents(pipe, encode_image(pipe, image))[0]
        uniform = reconstruct(model, invert(model, image, "", steps)).image  # the inversion is the edit's, cached
        add("recon vae", psnr(vae, image))
        add("recon ddim empty", psnr(ddim_reconstruct(model, image, "", 1.0, steps).image, image))
        add("recon ddim source", psnr(ddim_reconstruct(model, image, source, GUIDANCE, steps).image, image))
        add("recon uniform", psnr(uniform, image))

        # Background pixels of colour and shape edits, by margin: outside the source object and the target
        # scene's (a new shape covers other pixels). Also beyond one latent cell: an edit in latent space changes
        # whole cells, and the decoder spreads each over its neighbours, so pixels within a cell of the object
        # are the edit's own.
        backgrounds = {}
        if case.kind != "background":
            target_render = render(case.target)
            changing = (objects_mask(source_analysis) | objects_mask(analyze(target_render))).astype(np.uint8)
            with torch.no_grad():  # the perfect edit, as the VAE decodes it
                ideal = decode_latents(pipe, encode_image(pipe, target_render))[0]
            for suffix, margin in (("", MARGIN), (" cell", square(pipe.vae_scale_factor))):
                backgrounds[suffix] = outside = ~cv2.dilate(changing, margin).astype(bool)
                add(f"vae background psnr{suffix}", psnr(vae, image, outside))
                add(f"ideal background psnr{suffix}", psnr(ideal, image, outside))

        status = []
        for method, edited in (("uam", uam.image), ("plain", plain.image)):
            analysis = analyze(edited)
            got = matches(analysis, case.target, KINDS)
            others = [k for k in KINDS if k != case.kind]
            add(f"{method} target", got[case.kind])
            add(f"{method} others", all(got[k] for k in others))
            add(f"{method} success", got["all"])
            add(f"{method} success {case.kind}", got["all"])
            add(f"{method} position", bool(analysis.objects) and
                analysis.objects[0].position == source_analysis.objects[0].position)
            if case.kind == "background":
                inside = cv2.erode(objects_mask(source_analysis).astype(np.uint8), MARGIN).astype(bool)
                add(f"{method} object psnr", psnr(edited, image, inside))
            for suffix, outside in backgrounds.items():
                add(f"{method} background psnr{suffix}", psnr(edited, image, outside))
            status.append(f"{'UAM' if method == 'uam' else 'no uniform'} {'ok' if got['all'] else 'missed'}")
        if args.save:
            strip = Image.new("RGB", (4 * CANVAS, CANVAS))
            for k, picture in enumerate((image, uam.image, plain.image, uniform)):
                strip.paste(picture, (k * CANVAS, 0))
            args.save.mkdir(parents=True, exist_ok=True)
            strip.save(args.save / f"{i:03d}-{case.kind}.png")
        print(f"[{i + 1}/{len(todo)}] {case.kind}: {source!r} -> {target!r}: {', '.join(status)}", file=sys.stderr)

    report(rec, steps, time.perf_counter() - t0)


def report(rec: dict[str, list[float]], steps: int, seconds: float) -> None:
    """The table: UAM and no-uniform side by side, each target checked."""
    mean = {key: float(np.mean(values)) for key, values in rec.items()}

    def row(name: str, uam: str, plain: str = "", target: str = "", ok: bool | None = None) -> None:
        mark = "" if ok is None else ("  ok" if ok else "  MISSED")
        print(f"{name:44s} {uam:>16s} {plain:>16s}   {target}{mark}")

    def share(key: str) -> str:
        return f"{mean[key]:.1%} ({len(rec[key])})" if key in mean else "-"

    print()
    row("metric (cases)", "UAM edit", "no uniform", "target")
    row("edit success", share("uam success"), share("plain success"), ">= 80 %", mean["uam success"] >= 0.8)
    for kind in KINDS:
        row(f"  {kind} edits", share(f"uam success {kind}"), share(f"plain success {kind}"))
    row("  target attribute read", share("uam target"), share("plain target"))
    row("  other attributes kept", share("uam others"), share("plain others"))
    row("position kept", share("uam position"), share("plain position"), ">= 90 %", mean["uam position"] >= 0.9)
    for suffix, pixels in (("", "> 2 px"), (" cell", "> 1 latent cell")):
        if f"uam background psnr{suffix}" not in mean:
            continue
        uam, plain = mean[f"uam background psnr{suffix}"], mean[f"plain background psnr{suffix}"]
        ceiling = mean[f"vae background psnr{suffix}"]
        if suffix == " cell":  # the target is set beyond one latent cell (issue #20), the 2-px ring is shown
            row(f"background PSNR {pixels} out (dB)", f"{uam:.2f}", f"{plain:.2f}",
                f">= {ceiling - 2:.2f} (VAE - 2) and >= {plain + 0.8:.2f} (no uniform + 0.8)",
                uam >= ceiling - 2 and uam >= plain + 0.8)
        else:
            row(f"background PSNR {pixels} out (dB)", f"{uam:.2f}", f"{plain:.2f}")
        row("  VAE ceiling on the same pixels (dB)", f"{ceiling:.2f}")
        row("  ideal edit (target render) through the VAE", f"{mean[f'ideal background psnr{suffix}']:.2f}")
    if "uam object psnr" in mean:
        row("object PSNR, background edits (dB)", f"{mean['uam object psnr']:.2f}", f"{mean['plain object psnr']:.2f}")

    generation_rows = 2 * steps  # CFG: an unconditional and a conditional row per step
    gen = mean["generation time"]
    print()
    row(f"cost per edit ({steps} steps)", "UAM edit", "no uniform", "target")
    row("  time (s)", f"{mean['uam time']:.2f} = {mean['uam time'] / gen:.2f}x",
        f"{mean['plain time']:.2f} = {mean['plain time'] / gen:.2f}x", "<= 3.5x", mean["uam time"] / gen <= 3.5)
    row("  UNet rows", f"{mean['uam rows']:.0f} = {mean['uam rows'] / generation_rows:.2f}x",
        f"{mean['plain rows']:.0f} = {mean['plain rows'] / generation_rows:.2f}x", "<= 3.5x",
        mean["uam rows"] / generation_rows <= 3.5)
    row("  time, inversion cached (s)", f"{mean['cached time']:.2f} = {mean['cached time'] / gen:.2f}x", "",
        "<= 2.5x", mean["cached time"] / gen <= 2.5)
    row("  UNet rows, inversion cached", f"{mean['cached rows']:.0f} = {mean['cached rows'] / generation_rows:.2f}x",
        "", "<= 2.5x", mean["cached rows"] / generation_rows <= 2.5)
    row("  one generation (DDIM, CFG), the unit", f"{gen:.2f} s, {generation_rows} rows")

    print()
    row("reconstruction PSNR, no edit (dB)", "whole image")
    row("  VAE alone (ceiling)", f"{mean['recon vae']:.2f}")
    row('  DDIM inversion, "" (no CFG)', f"{mean['recon ddim empty']:.2f}")
    row(f"  DDIM inversion, source prompt, CFG {GUIDANCE}", f"{mean['recon ddim source']:.2f}")
    row("  UAM uniform branch (reconstruct)", f"{mean['recon uniform']:.2f}")
    print(f"\n({len(rec['uam time'])} images; {seconds:.0f} s in all)")


if __name__ == "__main__":
    main()
