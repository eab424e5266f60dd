"""Customization quality on the Shapes model: each method learns a subject and a style, side by side.

    python bench/customize_quality.py [--methods sc_tuner lora lora_conv sara] [--steps 400] [--seeds 2]
                                      [--concepts subject style] [--lr sc_tuner=2e-3 ...] [--guidance 7.5 1.5]

Subject: a held-out shape in a fixed colour (an orange star, trigger "sks"; 5 renders).
Style: the held-out outline style (trigger "zwx"; 8 renders of base shapes in outline).
Every method trains the same number of steps on the same data with prior preservation on
base-world regularisation renders (kohya's "reg images", captioned), then is scored by the
Shapes analyzer:
- fidelity: the trigger prompt shows the concept (subject: orange + star; style: outlined,
  with the prompt's colour and shape right, on colour/shape pairs never trained);
- context: the concept follows new contexts (positions, backgrounds) with everything right;
- preservation: the base prompts' accuracy (colour, shape, position all right) with the adapter
  attached, minus the base model's: the drop in points.
Every score is taken at each --guidance (CFG) scale: 7.5, diffusers' default, and 1.5, where the base model
is already 100 % right. On the shipped base the subject breaks at CFG 7.5: the trigger has a colour of its own
there ("a sks" draws a red square), and an adapter that edits every row makes the unconditional branch draw the
star too, so guidance amplifies only the colour difference (docs/benchmarks.md, customization, session 12).
--prior-caption-dropout trains the regularisation images on the empty caption a share of the time;
--instance-prompt-share trains the subject's images on "a sks" a share of the time; --uncond off scores with the
adapters off the unconditional branch (generate(adapters_on_uncond=False)), --uncond on off both ways (session 13);
--masked-loss learns only the subject's pixels, so its background is not learnt into the trigger (session 14);
--prior-loss-weight weighs the regularisation images' loss (DreamBooth's lambda, default 1; session 15);
--subject-backgrounds every shows the subject on each background at least once (session 18); --subject-images
renders more of the subject, each position again in a new size and background, --style-images more of the style
(session 19); --style-pairs trains the style on more colour-shape pairs (session 20), --style-seed draws its images
anew, --style-layout every takes each pair through every position and background (session 21). The style's
background contexts take new pairs that the VAE gives back right, and the bench prints each scored scene's VAE
ceiling (session 20).
Targets (issue #4): fidelity >= 80 %, context >= 80 %, preservation drop <= 5 points.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adapters import load_adapter
from pipelines import load_model
from pipelines.train import TrainConfig, train
from studio.shapes.dataset import write_atomic, write_scenes
from studio.shapes.quality import score_prompts, single_object_grid, vae_ceiling
from studio.shapes.world import BACKGROUNDS, BASE_SHAPES, COLORS, POSITIONS, Scene, ShapeObject, render, sample_scene

SUBJECT = ("orange", "star", "sks")
STYLE_TRIGGER = "zwx"
# Every attribute a scored scene can ask for (its VAE ceiling is read on these).
SCENE_ATTRIBUTES = ("color", "shape", "outline", "position", "background")
# Bench entry -> (adapter method, its options): each method at its usual settings. "lora" is the attention LoRA
# baseline of issue #4; "lora_conv" adds the resnets' convolutions (kohya's LoCon).
METHODS = {"sc_tuner": ("sc_tuner", {}), "lora": ("lora", {"rank": 8, "alpha": 8}),
           "lora_conv": ("lora", {"rank": 8, "alpha": 8, "target": "attn_conv"}), "sara": ("sara", {})}
# Matched steps; None: the method's own default (SaRA's auto LR).
METHOD_LR = {"sc_tuner": 5e-4, "lora": 5e-4, "lora_conv": 5e-4, "sara": None}


def write_captioned(out: Path, scenes: list[Scene], captions: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, (scene, text) in enumerate(zip(scenes, captions)):
        render(scene).save(out / f"{i:06d}.png")
        write_atomic(out / f"{i:06d}.txt", text.encode())


def subject_set(out: Path, seed: int = 0, subject: tuple[str, str, str] = SUBJECT,
                every_background: bool = False, images: int = 5) -> None:
    """`images` renders of the subject (colour, shape, trigger; default the orange star), cycling through the five
    positions, varied size/background; the trigger replaces "orange star" in the world caption, so the rest of the
    caption still teaches the context words. The backgrounds are drawn (the 5 of seed 0: gray, gray, white, white,
    white, never black); `every_background` shows each background at least once and, from 25 images, each
    position on each background, the positions and sizes kept:
    DreamBooth's advice to vary all but the subject; more `images` vary each position's size and background: 20 meet
    the targets where 5 memorise (docs/benchmarks.md, session 19)."""
    color, shape, trigger = subject
    rng = random.Random(seed)
    positions = rng.sample(list(POSITIONS), 5)
    scenes = [Scene((ShapeObject(color, shape, positions[i % 5], rng.choice((None, "small", "large"))),),
                    rng.choice(("white", "white", "gray", "black"))) for i in range(images)]
    if every_background:
        backgrounds = list(BACKGROUNDS) + ["white", "gray"]
        random.Random(seed).shuffle(backgrounds)
        # Shifted by one at each round of the five positions, so that a position meets every background. Cycled in
        # step with the positions (until session 26), each position kept one background: "a sks on a black
        # background" then meant one position.
        scenes = [dataclasses.replace(scene, background=backgrounds[(i + i // 5) % len(backgrounds)])
                  for i, scene in enumerate(scenes)]
    write_captioned(out, scenes, [s.caption().replace(f"{color} {shape}", trigger) for s in scenes])
    write_masks(out.parent / f"{out.name}_masks", scenes)


def write_masks(out: Path, scenes: list[Scene]) -> None:
    """Each scene's object coverage as a mask image of the same name (TrainConfig.mask_dir): a pixel's coverage
    is 1 - (its white-background render - its black-background render) / 255, exact for the anti-aliased edges."""
    out.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        on_white, on_black = (np.asarray(render(dataclasses.replace(scene, background=bg)), np.float32)
                              for bg in ("white", "black"))
        coverage = 1 - (on_white - on_black).mean(axis=2) / 255
        Image.fromarray(np.round(255 * coverage).astype(np.uint8), "L").save(out / f"{i:06d}.png")


def style_set(out: Path, seed: int = 1, images: int = 8, pairs: int = 8, draw: int = 0,
              every_position: bool = False) -> list[tuple[str, str]]:
    """`images` renders in the outline style, cycling through `pairs` (colour, shape) pairs, their positions and
    backgrounds drawn as the subject's (a style's images vary in all but the style; until session 14 they were all
    white); returns the pairs trained, to test on others. The first 8 pairs are the same for any `pairs`; `draw`
    other than 0 draws the positions and backgrounds anew, the pairs kept (session 21). `every_position` takes each
    pair through the five positions and the backgrounds in turn instead of drawing them: drawn, a shape can miss a
    position in every image (session 21: the circles never on the left, and "a zwx circle on the left" is drawn
    centred)."""
    rng = random.Random(seed)
    drawn = rng.sample([(c, s) for c in COLORS for s in BASE_SHAPES], 8)
    rest = [(c, s) for c in COLORS for s in BASE_SHAPES if (c, s) not in drawn]
    drawn += random.Random(seed + 1).sample(rest, pairs - 8) if pairs > 8 else []
    pairs_trained = drawn[:pairs]
    rng = random.Random(f"style-draw-{draw}") if draw else rng
    scenes = [Scene((ShapeObject(*pairs_trained[i % pairs], rng.choice(list(POSITIONS)), None, True),),
                    rng.choice(("white", "white", "gray", "black"))) for i in range(images)]
    if every_position:  # image i shows pair i % pairs for the (i // pairs)-th time: the next position and background
        positions, backgrounds = rng.sample(list(POSITIONS), 5), rng.sample(["white", "white", "gray", "black"], 4)
        scenes = [Scene((dataclasses.replace(scene.objects[0], position=positions[(i % pairs + i // pairs) % 5]),),
                        backgrounds[(i % pairs + i // pairs) % 4]) for i, scene in enumerate(scenes)]
    write_captioned(out, scenes, [s.caption().replace("outline", STYLE_TRIGGER) for s in scenes])
    return pairs_trained


def regularisation_set(out: Path, n: int = 64, seed: int = 2) -> None:
    rng = random.Random(seed)
    write_scenes(out, [sample_scene(rng, BASE_SHAPES, two_object_prob=0.0) for _ in range(n)])


def subject_scenes() -> tuple[list[Scene], list[Scene]]:
    """The subject's scored scenes: centred on white (fidelity), and six contexts (four positions, a black and a
    gray background)."""
    color, shape, _ = SUBJECT
    plain = [Scene((ShapeObject(color, shape),))]
    contexts = [Scene((ShapeObject(color, shape, p),)) for p in ("left", "right", "top", "bottom")] + [
        Scene((ShapeObject(color, shape),), bg) for bg in ("black", "gray")]
    return plain, contexts


def style_scenes(vae, trained: list[tuple[str, str]]) -> tuple[list[Scene], list[Scene]]:
    """The style's scored scenes, all on colour-shape pairs never trained: six centred on white (fidelity), and
    five contexts (left, right, top, a black and a gray background). Each background takes the first new pair
    whose render the VAE gives back right (`vae_ceiling`): through the shipped VAE a thin red or yellow outline on
    gray comes back orange, so no tuner could score it (until session 20 the gray context was such a pair)."""
    new = [(c, s) for c in COLORS for s in BASE_SHAPES if (c, s) not in trained][:6]
    plain = [Scene((ShapeObject(c, s, "center", None, True),)) for c, s in new]
    contexts = [Scene((ShapeObject(c, s, p, None, True),)) for (c, s), p in zip(new, ("left", "right", "top"))]
    for background, start in (("black", 3), ("gray", 4)):
        candidates = [Scene((ShapeObject(c, s, "center", None, True),), background) for c, s in new[start:] + new]
        contexts.append(next((scene for scene in candidates if vae_ceiling(vae, scene, SCENE_ATTRIBUTES) == 1.0),
                             candidates[0]))
    return plain, contexts


def evaluate(pipe, concept: str, scenes: tuple[list[Scene], list[Scene]], seeds: list[int], steps: int,
             guidance: float, on_uncond: bool = True) -> dict[str, float]:
    """Fidelity and context (with each context's score) of a concept, its scenes prompted with the trigger."""
    plain, contexts = scenes
    if concept == "subject":
        color, shape, trigger = SUBJECT
        attributes, rewrite = ("color", "shape"), lambda c: c.replace(f"{color} {shape}", trigger)
    else:
        attributes, rewrite = ("color", "shape", "outline"), lambda c: c.replace("outline", STYLE_TRIGGER)
    fid = _score(pipe, plain, seeds, steps, guidance, attributes, rewrite, on_uncond)
    per_context = {scene.caption(): _score(pipe, [scene], seeds, steps, guidance,
                                           (*attributes, "position", "background"), rewrite, on_uncond)
                   for scene in contexts}
    return {"fidelity": fid, "context": float(np.mean(list(per_context.values()))), "per_context": per_context}


def _score(pipe, scenes, seeds, steps, guidance, attributes, rewrite, on_uncond) -> float:
    """Share of images with every attribute right, each scene prompted by its caption rewritten for the trigger."""
    prompts = [rewrite(scene.caption()) for scene in scenes]
    return score_prompts(pipe, scenes, seeds, num_inference_steps=steps, guidance_scale=guidance,
                         attributes=attributes, prompts=prompts, adapters_on_uncond=on_uncond)["all"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--concepts", nargs="+", default=["subject", "style"], choices=["subject", "style"])
    p.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                   help="learning rate of a method (default: METHOD_LR; 'auto' for the method's own)")
    p.add_argument("--option", nargs="+", default=[], metavar="KEY=VALUE",
                   help="an adapter option for every method, e.g. dropout=0.1 (its config's field, parsed as JSON)")
    p.add_argument("--steps", type=int, default=400, help="training steps, the same for every method")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2, help="seeds per evaluation prompt")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the evaluation images")
    p.add_argument("--guidance", type=float, nargs="+", default=[7.5, 1.5],
                   help="CFG scales to evaluate at (the Shapes base model is 100 %% right from 1.5 up)")
    p.add_argument("--prior-caption-dropout", type=float, default=0.0,
                   help="share of regularisation images trained with the empty caption (TrainConfig)")
    p.add_argument("--prior-loss-weight", type=float, default=1.0,
                   help="the regularisation images' loss weight (TrainConfig.prior_loss_weight: DreamBooth's lambda)")
    p.add_argument("--instance-prompt-share", type=float, default=0.0,
                   help="subject: share of its images trained on the instance prompt 'a sks' (TrainConfig)")
    p.add_argument("--scale", type=float, default=1.0, help="the adapter's scale when scoring (as generate's)")
    p.add_argument("--masked-loss", action="store_true",
                   help="subject: learn only the star's pixels (TrainConfig.masked_loss, masks of its coverage)")
    p.add_argument("--subject-backgrounds", default="drawn", choices=["drawn", "every"],
                   help="subject: backgrounds as drawn (sessions 7-17: no black one) or every background at least once")
    p.add_argument("--subject-images", type=int, default=5,
                   help="subject: renders, cycling through the five positions (DreamBooth uses 3-5, kohya users 10-20)")
    p.add_argument("--subject-seed", type=int, default=0, help="subject: the draw of its positions, sizes, backgrounds")
    p.add_argument("--style-images", type=int, default=8,
                   help="style: renders, cycling through its 8 colour-shape pairs in new positions and backgrounds")
    p.add_argument("--style-seed", type=int, default=0,
                   help="style: the draw of its images' positions and backgrounds (its pairs kept)")
    p.add_argument("--style-layout", default="drawn", choices=["drawn", "every"],
                   help="style: positions and backgrounds drawn per image, or each pair at every position in turn")
    p.add_argument("--style-pairs", type=int, default=8,
                   help="style: colour-shape pairs its images cycle through (1-12; the 6 scored are never trained)")
    p.add_argument("--uncond", nargs="+", default=["on"], choices=["on", "off"],
                   help="score with the adapters on the unconditional branch (on: diffusers' and A1111's way), "
                        "off it (generate(adapters_on_uncond=False)), or both")
    p.add_argument("--model", default=None)
    p.add_argument("--work", type=Path, default=None,
                   help="keep data and adapters here (default: a temp dir); adapters already there are not retrained")
    args = p.parse_args()
    if not 1 <= args.style_pairs <= 12:
        p.error(f"--style-pairs {args.style_pairs}: choose 1-12, so that 6 of the 18 colour-shape pairs stay new")
    learning_rates = dict(METHOD_LR)
    for item in args.lr:
        method, _, value = item.partition("=")
        learning_rates[method] = None if value == "auto" else float(value)

    extra_options = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.option)}
    model = load_model(args.model)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    work = args.work or Path(tempfile.mkdtemp(prefix="customize-"))
    subject_set(work / "data" / "subject", seed=args.subject_seed, every_background=args.subject_backgrounds == "every",
                images=args.subject_images)
    scenes = {"subject": subject_scenes(),
              "style": style_scenes(pipe.vae, style_set(work / "data" / "style", images=args.style_images,
                                                        pairs=args.style_pairs, draw=args.style_seed,
                                                        every_position=args.style_layout == "every"))}
    for concept in args.concepts:  # what the decoder can give back of each scored scene (1 = all of it)
        plain, contexts = scenes[concept]
        print(f"{concept}: VAE ceiling of the scored scenes: " + ", ".join(
            f"{scene.caption()!r} {vae_ceiling(pipe.vae, scene, SCENE_ATTRIBUTES):.0%}" for scene in plain + contexts))
    regularisation_set(work / "data" / "reg")
    grid = single_object_grid(positions=("center", "left", "right"))

    base_pres = {g: score_prompts(pipe, grid, seeds, num_inference_steps=args.sample_steps, guidance_scale=g)["all"]
                 for g in args.guidance}
    rows = []  # (method, concept, params, train time, {guidance: (fidelity, context, preservation)})
    print(f"base model: preservation grid accuracy {base_pres} by CFG ({len(grid)} prompts x {len(seeds)} seeds)")
    for method in args.methods:
        adapter_method, options = METHODS[method]
        options = {**options, **extra_options}
        for concept in args.concepts:
            trigger = SUBJECT[2] if concept == "subject" else STYLE_TRIGGER
            config = TrainConfig(
                data_dir=work / "data" / concept, output_dir=work / "runs" / f"{method}-{concept}",
                method=adapter_method, method_options=options, name=f"{method}-{concept}", trigger=trigger,
                class_prompt="a shape", class_dir=work / "data" / "reg", num_class_images=64,
                prior_loss_weight=args.prior_loss_weight, prior_caption_dropout=args.prior_caption_dropout,
                steps=args.steps,
                instance_prompt=f"a {trigger}" if concept == "subject" else None,
                instance_prompt_share=args.instance_prompt_share if concept == "subject" else 0.0,
                masked_loss=args.masked_loss and concept == "subject",
                mask_dir=work / "data" / "subject_masks" if args.masked_loss and concept == "subject" else None,
                batch_size=args.batch_size, learning_rate=learning_rates.get(method), checkpoint_every=0, seed=0,
            )
            adapter_path = config.output_dir / f"{config.adapter_name}.safetensors"
            train_time = "reused"  # an adapter already in --work is scored again, not retrained
            if not adapter_path.exists():
                t0 = time.time()
                adapter_path = train(pipe, config).adapter_path
                train_time = f"{time.time() - t0:.0f}s"
            adapter = load_adapter(adapter_path, pipe.unet)
            adapter.set_scale(args.scale)
            n_params = sum(p.numel() for p in adapter.trainable_parameters())
            scores = {}
            try:
                for g, uncond in itertools.product(args.guidance, args.uncond):
                    on = uncond == "on"
                    if not (on or adapter.acts_per_row):  # SaRA: one scale per call (its delta is in the weights)
                        scores[g, uncond] = None
                        continue
                    s = evaluate(pipe, concept, scenes[concept], seeds, args.sample_steps, g, on)
                    pres = score_prompts(pipe, grid, seeds, num_inference_steps=args.sample_steps, guidance_scale=g,
                                         adapters_on_uncond=on)
                    scores[g, uncond] = (s["fidelity"], s["context"], pres["all"])
                    print(f"{method} {concept} CFG {g:g} uncond {uncond}: fidelity {s['fidelity']:.1%} context "
                          f"{s['context']:.1%} preservation {pres['all']:.1%} (drop "
                          f"{100 * (base_pres[g] - pres['all']):+.1f} pts), train {train_time}", flush=True)
                    if "per_context" in s:
                        print("  per context: " + ", ".join(f"{c!r} {v:.0%}" for c, v in s["per_context"].items()))
            finally:
                adapter.detach()
            rows.append((method, concept, f"{n_params / 1e3:.1f}k", train_time, scores))

    print(f"\n{args.steps} steps x batch {args.batch_size} (+ prior batch) per method, adapter scale {args.scale:g}, "
          "learning rates "
          f"{ {m: learning_rates.get(m) or 'auto' for m in args.methods} }; evaluation: "
          f"{args.sample_steps} DDIM steps, {len(seeds)} seeds; {torch.get_num_threads()} threads")
    print(f"{'CFG':>4s} {'uncond':6s} {'method':10s} {'concept':8s} {'params':>9s} {'train':>6s} {'fidelity':>9s} "
          f"{'context':>8s} {'base acc':>9s} {'drop':>7s}")
    for g in args.guidance:
        print(f"{g:4g} {'':6s} {'base model':10s} {'':8s} {'-':>9s} {'-':>6s} {'-':>9s} {'-':>8s} {base_pres[g]:9.0%}")
        for (method, concept, n, t, scores), uncond in itertools.product(rows, args.uncond):
            if scores[g, uncond] is None:
                print(f"{g:4g} {uncond:6s} {method:10s} {concept:8s} {n:>9s} {t:>6s}   (takes one scale per call)")
                continue
            fid, ctx, pres = scores[g, uncond]
            print(f"{g:4g} {uncond:6s} {method:10s} {concept:8s} {n:>9s} {t:>6s} {fid:9.0%} {ctx:8.0%} {pres:9.0%} "
                  f"{100 * (base_pres[g] - pres):+7.1f}")
    print("targets: fidelity >= 80 %, context >= 80 %, preservation drop <= 5 points")


if __name__ == "__main__":
    main()
