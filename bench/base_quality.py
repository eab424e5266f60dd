"""Base-model quality on the Shapes world: prompt fidelity per attribute and VAE reconstruction.

    python bench/base_quality.py [--model assets/shapes-sd] [--seeds 4] [--steps 25]

The grid is fixed: every base colour x shape x the five positions, plus 30 two-object prompts,
4 seeds each, 25 DDIM steps, guidance 7.5, scored by the Shapes analyzer. Targets (issues #3, #15):
colour >= 95 %, shape >= 90 %, position >= 90 %, two-object all-four-attributes >= 60 %,
VAE PSNR >= 30 dB; a held-out shape in <= 1 % of the grid's images (nothing named draws one).
It also prints what the unconditional branch draws (empty prompt, CFG 1, --unconditional-seeds images):
the share with a held-out shape and with an outline, the content base training shows but never names; and
what "a <word>" draws for trigger words no caption uses, 8 seeds each: the share of a word's images showing
its most common colour and shape (100 % when an unknown word means one fixed thing). Last, how local text is
(`--only locality` prints this alone): per UNet block, the share of a two-object prompt's object words' cross-attention
that falls in the object's own half (0.5: not local; on a real checkpoint a word's map covers its object, and
LoRA-Composer's loss steers those maps).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from pipelines import load_model
from studio.shapes.quality import (
    cross_attention_locality,
    score_prompts,
    single_object_grid,
    two_object_scenes,
    unknown_word_readings,
    unnamed_content,
    vae_reconstruction,
)

# Trigger words users pick, none a world word: "a <word>" should not mean one fixed thing (SHAPES.md's rule
# on what a real checkpoint has seen; studio/shapes/train.py --unknown-words).
UNKNOWN_WORDS = ("sks", "zwx", "ohwx", "qq", "tok", "xyz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model source (default: the embedded Shapes model)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--unconditional-seeds", type=int, default=96)
    p.add_argument("--only", choices=["locality"], default=None, help="print the cross-attention locality alone")
    args = p.parse_args()

    model = load_model(args.model)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {pipe.device}; model {model.name}")
    t0 = time.time()
    if args.only == "locality":
        print_locality(pipe, seeds, args.steps, args.guidance, t0)
        return
    single = score_prompts(pipe, single_object_grid(), seeds, num_inference_steps=args.steps,
                           guidance_scale=args.guidance)
    pairs = score_prompts(pipe, two_object_scenes(), seeds, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, attributes=("color", "shape", "position"))
    named_prompts = [scene.caption() for scene in single_object_grid() + two_object_scenes()]
    named = unnamed_content(pipe, named_prompts, seeds, num_inference_steps=args.steps, guidance_scale=args.guidance)
    unconditional = unnamed_content(pipe, [""], list(range(args.unconditional_seeds)), num_inference_steps=args.steps,
                                    guidance_scale=1.0)
    unknown = unknown_word_readings(pipe, UNKNOWN_WORDS, list(range(8)), num_inference_steps=args.steps,
                                    guidance_scale=args.guidance)
    vae = vae_reconstruction(pipe.vae)
    rows = [
        ("colour (single objects)", single["color"], 0.95),
        ("shape (single objects)", single["shape"], 0.90),
        ("position (single objects)", single["position"], 0.90),
        ("all three (single objects)", single["all"], None),
        ("two-object: colour", pairs["color"], None),
        ("two-object: shape", pairs["shape"], None),
        ("two-object: all four attributes", pairs["all"], 0.60),
    ]
    print(f"{'metric':36s} {'value':>8s} {'target':>8s}")
    for name, value, target in rows:
        mark = "" if target is None else ("  ok" if value >= target else "  MISSED")
        print(f"{name:36s} {value:8.1%} {'' if target is None else f'{target:.0%}':>8s}{mark}")
    mark = "  ok" if named["held_out_shape"] <= 0.01 else "  MISSED"
    print(f"{'named prompts: a held-out shape':36s} {named['held_out_shape']:8.1%} {'<= 1%':>8s}{mark}")
    print(f"{'named prompts: an outline':36s} {named['outline']:8.1%}")
    for key, label in (("held_out_shape", "a held-out shape"), ("outline", "an outline"), ("either", "either")):
        print(f"{'unconditional: ' + label:36s} {unconditional[key]:8.1%}")
    print(f"{'unknown words: top reading':36s} {unknown['top_reading']:8.1%}")
    print(f"{'unknown words: a held-out shape':36s} {unknown['held_out_shape']:8.1%}")
    for key, value in vae.items():
        if key.startswith("psnr"):
            target = 30.0 if key == "psnr_all" else None
            mark = "" if target is None else ("  ok" if value >= target else "  MISSED")
            print(f"{'VAE ' + key + ' (dB, 200 renders)':36s} {value:8.2f} {'' if target is None else '30':>8s}{mark}")
    print(f"{'VAE reconstructions read right':36s} {vae['analyzer_kept']:8.1%}")
    print(f"({len(named_prompts)} prompts x {len(seeds)} seeds, {args.steps} DDIM steps, CFG {args.guidance}; "
          f"unconditional: empty prompt x {args.unconditional_seeds} seeds, CFG 1; {time.time() - t0:.0f}s)")
    print_locality(pipe, seeds, args.steps, args.guidance, time.time())


def print_locality(pipe, seeds: list[int], steps: int, guidance: float, t0: float) -> None:
    locality = cross_attention_locality(pipe, seeds, num_inference_steps=steps, guidance_scale=guidance)
    print("cross-attention locality: an object's words' attention in its own half (0.5: not local)")
    for block, share in locality.items():
        print(f"  {block:34s} {share:8.1%}")
    print(f"(8 two-object prompts x {len(seeds)} seeds, {steps} DDIM steps, CFG {guidance}; {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
