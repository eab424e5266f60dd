"""Prompt-fidelity and VAE measurements of a model on the Shapes world (shared by bench/ and tests/)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
import torch

from adapters import call_context
from pipelines.generate import encode_call

from .analyzer import analyze, score_scene
from .world import (
    BASE_SHAPES,
    COLORS,
    HELD_OUT_SHAPES,
    MAX_JITTER,
    PAIRS,
    POSITIONS,
    Scene,
    ShapeObject,
    render,
    sample_scene,
)


def single_object_grid(colors: Sequence[str] = tuple(COLORS), shapes: Sequence[str] = BASE_SHAPES,
                       positions: Sequence[str] = tuple(POSITIONS)) -> list[Scene]:
    """Every colour x shape x position, one object on white."""
    return [Scene((ShapeObject(c, s, p),)) for c in colors for s in shapes for p in positions]


def two_object_scenes(n: int = 30, seed: int = 1234, shapes: Sequence[str] = BASE_SHAPES) -> list[Scene]:
    """n fixed two-object scenes (distinct colour or shape per object, so the binding is tested)."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        p1, p2 = rng.choice(PAIRS)
        a = ShapeObject(rng.choice(list(COLORS)), rng.choice(shapes), p1)
        b = ShapeObject(rng.choice(list(COLORS)), rng.choice(shapes), p2)
        if (a.color, a.shape) != (b.color, b.shape):
            scenes.append(Scene((a, b)))
    return scenes


def generate_at_seeds(pipe, prompt: str, seeds: Sequence[int], *, num_inference_steps: int,
                      guidance_scale: float, adapters_on_uncond: bool = True) -> list:
    """One 64x64 image of `prompt` per seed, in one batch (each seed its own CPU generator), in the call context
    the studio's pipelines give the attached adapters (adapters_on_uncond: as `generate`'s)."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    embeds, context = encode_call(pipe, prompt, "", len(seeds), guidance_scale)
    context.adapters_on_uncond = adapters_on_uncond
    with call_context(pipe.unet, context):
        return pipe(**embeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    num_images_per_prompt=len(seeds), generator=generators, height=64, width=64).images


@torch.no_grad()
def score_prompts(pipe, scenes: Sequence[Scene], seeds: Sequence[int], *, num_inference_steps: int = 25,
                  guidance_scale: float = 7.5, attributes: Sequence[str] = ("color", "shape", "position"),
                  prompts: Sequence[str] | None = None, adapters_on_uncond: bool = True) -> dict[str, float]:
    """Generate every scene (prompted by its caption, or by `prompts[i]`, e.g. with a trigger word standing
    for the concept) at every seed and return the analyzer's accuracy per attribute (and "all": every
    attribute of every object right)."""
    hits: dict[str, list[bool]] = {}
    for i, scene in enumerate(scenes):
        images = generate_at_seeds(pipe, scene.caption() if prompts is None else prompts[i], seeds,
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   adapters_on_uncond=adapters_on_uncond)
        for image in images:
            for key, ok in score_scene(image, scene, attributes).items():
                hits.setdefault(key, []).append(ok)
    return {key: float(np.mean(v)) for key, v in hits.items()}


@torch.no_grad()
def unnamed_content(pipe, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int = 25,
                    guidance_scale: float = 7.5) -> dict[str, float]:
    """Share of images in which the analyzer finds a held-out shape, an outlined object, or either: the
    content base training shows only under the empty caption (studio/shapes/train.py). Named prompts should give ~0; the
    empty prompt at CFG 1 shows what the unconditional branch learned to draw."""
    found: dict[str, list[bool]] = {"held_out_shape": [], "outline": [], "either": []}
    for prompt in prompts:
        for image in generate_at_seeds(pipe, prompt, seeds, num_inference_steps=num_inference_steps,
                                       guidance_scale=guidance_scale):
            objects = analyze(image).objects
            held_out = any(o.shape in HELD_OUT_SHAPES for o in objects)
            outline = any(o.outline for o in objects)
            found["held_out_shape"].append(held_out)
            found["outline"].append(outline)
            found["either"].append(held_out or outline)
    return {key: float(np.mean(v)) for key, v in found.items()}


@torch.no_grad()
def unknown_word_readings(pipe, words: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int = 25,
                          guidance_scale: float = 7.5) -> dict[str, float]:
    """What "a <word>" draws for words no caption uses (trigger words such as "sks"): per word, the share of its
    images showing its most common (colour, shape) reading, averaged over the words ("top_reading": 1.0 when
    every word means one fixed thing, as no rare token of a real checkpoint does), and the share of images
    showing a held-out shape."""
    top, held_out = [], []
    for word in words:
        readings = []
        for image in generate_at_seeds(pipe, f"a {word}", seeds, num_inference_steps=num_inference_steps,
                                       guidance_scale=guidance_scale):
            objects = analyze(image).objects
            readings.append((objects[0].color, objects[0].shape) if objects else None)
            held_out.append(any(o.shape in HELD_OUT_SHAPES for o in objects))
        top.append(max(readings.count(r) for r in set(readings)) / len(readings))
    return {"top_reading": float(np.mean(top)), "held_out_shape": float(np.mean(held_out))}


@torch.no_grad()
def vae_reconstruction(vae, n: int = 200, seed: int = 7, shapes: Sequence[str] | None = None) -> dict[str, float]:
    """PSNR (dB) of VAE reconstructions of n seeded renders, overall and per background, and the share of
    reconstructions the analyzer still reads right (colour, shape, position of every object)."""
    from .world import SHAPES

    rng = random.Random(seed)
    scenes = [sample_scene(rng, tuple(shapes or SHAPES), outline_prob=0.2) for _ in range(n)]
    psnr: dict[str, list[float]] = {}
    kept = []
    for scene in scenes:
        x, y = vae_round_trip(vae, scene)
        mse = float(((y - x) ** 2).mean()) / 4  # in [0, 1] pixel units
        value = 10 * np.log10(1 / max(mse, 1e-10))
        psnr.setdefault("all", []).append(value)
        psnr.setdefault(scene.background, []).append(value)
        kept.append(score_scene(to_uint8(y), scene, ("color", "shape", "position"))["all"])
    out = {f"psnr_{k}": float(np.mean(v)) for k, v in psnr.items()}
    out["analyzer_kept"] = float(np.mean(kept))
    return out


# The centre and the four corners of the world's position jitter (world.MAX_JITTER).
JITTER_CORNERS = ((0, 0), (-MAX_JITTER, -MAX_JITTER), (MAX_JITTER, -MAX_JITTER), (-MAX_JITTER, MAX_JITTER),
                  (MAX_JITTER, MAX_JITTER))


@torch.no_grad()
def vae_ceiling(vae, scene: Scene, attributes: Sequence[str]) -> float:
    """Share of the scene's renders (centred and at the jitter's four corners) that the analyzer still reads right
    after a round trip through the VAE. Every generated image comes out of the decoder, so a scene whose renders the
    decoder cannot give back right (a thin red outline on gray comes back orange) measures the VAE, not a tuner:
    an estimate of the most any method can score on it."""
    hits = []
    for offset in JITTER_CORNERS:
        jittered = dataclasses.replace(scene, jitter=(offset,) * len(scene.objects))
        hits.append(score_scene(to_uint8(vae_round_trip(vae, jittered)[1]), scene, attributes)["all"])
    return float(np.mean(hits))


@torch.no_grad()
def vae_round_trip(vae, scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """The scene's render and its reconstruction through the VAE (the posterior mean decoded), each (1, 3, H, W)
    in [-1, 1] on the CPU."""
    x = torch.from_numpy(np.array(render(scene))).permute(2, 0, 1)[None].float() / 127.5 - 1
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    return x, vae.decode(z).sample.float().clamp(-1, 1).cpu()


def to_uint8(y: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((y[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
