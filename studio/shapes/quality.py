"""Prompt-fidelity and VAE measurements of a model on the Shapes world (shared by bench/ and tests/)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
import torch

from adapters import call_context
from adapters.composer import grid_of
from adapters.processors import ProcessorSwap, WrappingProcessor, attention_layers
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


class CrossAttentionRecorder(WrappingProcessor):
    """Passes the call on unchanged; keeps each call's cross-attention probabilities (B, queries, tokens),
    averaged over heads."""

    def __init__(self, base_processor, maps: list[torch.Tensor]):
        super().__init__(base_processor)
        self.maps = maps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k).unflatten(0, (hidden_states.shape[0], attn.heads)).mean(dim=1)
        self.maps.append(probs)
        return self.base_processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def object_word_positions(tokenizer, caption: str, scene: Scene) -> list[list[int]]:
    """Per object, the token positions of its colour and shape words in the encoded caption."""
    ids = tokenizer(caption).input_ids
    positions, start = [], 0
    for obj in scene.objects:
        found = []
        for word in (obj.color, obj.shape):
            word_ids = tokenizer(word, add_special_tokens=False).input_ids
            at = next(i for i in range(start, len(ids)) if ids[i:i + len(word_ids)] == word_ids)
            found += range(at, at + len(word_ids))
        positions.append(found)
        start = max(found) + 1
    return positions


def _own_half(position: str, h: int, w: int) -> torch.Tensor:
    """(h, w) bool: the half of the grid an object at `position` (of a two-object layout) is drawn in."""
    rows, cols = torch.arange(h)[:, None].expand(h, w), torch.arange(w)[None, :].expand(h, w)
    return {"left": cols < w // 2, "right": cols >= w // 2, "top": rows < h // 2, "bottom": rows >= h // 2}[position]


@torch.no_grad()
def cross_attention_locality(pipe, seeds: Sequence[int], *, n: int = 8, num_inference_steps: int = 25,
                             guidance_scale: float = 7.5) -> dict[str, float]:
    """Whether text acts where its object is drawn: for n two-object prompts (distinct colours and shapes, one
    object per half), the share of each object's word maps (its colour and shape tokens' cross-attention, summed,
    averaged over heads) that falls in its own half, per UNet block ("down_blocks.0 16x16", ...), averaged over
    objects, denoising steps, seeds and prompts. 0.5: the words reach both halves alike. On a real checkpoint a
    word's map covers its object (DAAM, Tang et al., arXiv 2210.04885); LoRA-Composer's loss steers these maps
    (docs/benchmarks.md, bench/fusion_quality.py, session 22)."""
    scenes = [scene for scene in two_object_scenes(4 * n)
              if len({o.color for o in scene.objects}) == 2 and len({o.shape for o in scene.objects}) == 2][:n]
    layers = attention_layers(pipe.unet, "cross")
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    shares: dict[str, list[float]] = {}
    with ProcessorSwap(layers, lambda name, base: CrossAttentionRecorder(base, maps[name])):
        for scene in scenes:
            for recorded in maps.values():
                recorded.clear()
            generate_at_seeds(pipe, scene.caption(), seeds, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale)
            words = object_word_positions(pipe.tokenizer, scene.caption(), scene)
            for name, recorded in maps.items():
                # (steps, seeds, queries, tokens): the conditional rows, last in the batch (after CFG's unconditional)
                probs = torch.stack(recorded)[:, -len(seeds):].float()
                h, w = grid_of(probs.shape[2], (64, 64))
                block = ".".join(name.split(".")[:2]) if name.startswith(("down", "up")) else "mid_block"
                for obj, positions in zip(scene.objects, words):
                    word_map = probs[..., positions].sum(dim=-1).reshape(*probs.shape[:2], h, w)
                    own = word_map[..., _own_half(obj.position, h, w)].sum(dim=-1) / word_map.sum(dim=(-2, -1))
                    shares.setdefault(f"{block} {h}x{w}", []).append(own.mean().item())
    return {key: float(np.mean(values)) for key, values in shares.items()}


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
