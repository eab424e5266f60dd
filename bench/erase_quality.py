"""Concept erasure with SPM membranes on the Shapes model (issue #18): erase "triangle", and separately "yellow".

    python bench/erase_quality.py [--steps 400] [--lr 1e-4] [--anchor-weight 1000] [--eta 1] [--seeds 4]
        [--work runs/erase-bench]

For each membrane, side by side for transport off (a static membrane), additive (gamma U D x) and squared
(gamma^2, the reference code's), the Shapes analyzer scores at CFG 7.5:
- erasure: images of prompts naming the concept (colours, positions, sizes, backgrounds, paraphrases) that do not
  show it (triangle: no triangle; yellow: no yellow object); two-object scenes also need the other object intact;
- kept: the accuracy (colour, shape and position right) on single objects that do not involve the concept, with the
  membrane against the base model: the drop in points;
- gamma of unrelated prompts, with the paper's flattened cosine and with padding excluded (the ablation);
- an adversarial probe: a prompt embedding optimised for --attack-steps on renders of the concept through the
  membraned model (no tokens, so transport sees only the embedding), then the share of its images showing it;
- the membrane's training time and parameters, and generation time with two membranes against none;
- transfer: the triangle membrane, unchanged, on a derived checkpoint (the base with a LoRA customization merged
  in, trained here on 5 renders of an orange star "sks"): erasure and kept there, against the derived model alone.
Targets: erasure >= 90 %; kept: drop <= 5 points with transport, and smaller than without (the paper's claim);
generation with two membranes <= 1.10x without. Membranes already in --work are not retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters import CallContext, Row, call_context, load_adapter, merge_into
from adapters.spm import SIMILARITIES
from pipelines import generate, load_model
from pipelines.architectures import count_parameters
from pipelines.erase import erase, membrane_gammas
from pipelines.generate import text_encoding
from pipelines.train import TrainConfig, train
from studio.shapes.analyzer import analyze, score_scene
from studio.shapes.world import BACKGROUNDS, BASE_SHAPES, COLORS, POSITIONS, SIZES, Scene, ShapeObject, render

CONCEPTS = ("triangle", "yellow")
TRANSPORTS = ("off", "additive", "squared")
UNRELATED = ("a blue circle", "a green square on the left", "a red circle on a black background",
             "a purple square and an orange circle", "a large green circle on the right")


def naming_scenes(concept: str, rng: random.Random) -> tuple[list[tuple[str, Scene]], list[tuple[str, Scene]]]:
    """(prompt, scene) pairs naming the concept: single objects in every colour/shape, position, size and
    background, and two-object scenes with another object that must survive."""
    is_shape = concept in BASE_SHAPES
    singles = []
    for i in range(24):
        color = rng.choice([c for c in COLORS if is_shape or c == concept])
        shape = concept if is_shape else rng.choice(BASE_SHAPES)
        obj = ShapeObject(color, shape, rng.choice(list(POSITIONS)), rng.choice((None, *SIZES)))
        scene = Scene((obj,), rng.choice(list(BACKGROUNDS)) if i % 3 == 0 else "white")
        singles.append((scene.caption(), scene))
    word = concept if is_shape else f"{concept} circle"
    singles += [(text, Scene((ShapeObject("red" if is_shape else concept, "triangle" if is_shape else "circle"),)))
                for text in (word, f"a {word} shape", f"{word}s", f"one {word}, centred")]  # paraphrases
    pairs = []
    for _ in range(8):
        other = ShapeObject(rng.choice([c for c in COLORS if c != concept]),
                            rng.choice([s for s in BASE_SHAPES if s != concept]), "right")
        named = ShapeObject(rng.choice([c for c in COLORS if is_shape or c == concept]),
                            concept if is_shape else rng.choice(BASE_SHAPES), "left")
        scene = Scene((named, other))
        pairs.append((scene.caption(), scene))
    return singles, pairs


def shows(obj, concept: str) -> bool:
    return obj.shape == concept if concept in BASE_SHAPES else obj.color == concept


def erased(image, concept: str) -> bool:
    return not any(shows(obj, concept) for obj in analyze(image).objects)


def images(model, prompt: str, seeds: int, adapters: list) -> list:
    return generate(model, prompt, seed=0, num_images_per_prompt=seeds, num_inference_steps=20,
                    adapters=adapters).images


def score(model, concept: str, adapters: list, seeds: int, rng_seed: int = 0) -> dict[str, float]:
    singles, pairs = naming_scenes(concept, random.Random(rng_seed))
    single_hits = [erased(im, concept) for prompt, _ in singles for im in images(model, prompt, seeds, adapters)]
    pair_hits = []
    for prompt, scene in pairs:
        for im in images(model, prompt, seeds, adapters):
            other = scene.objects[1]
            kept = score_scene(im, Scene((other,)), ("color", "shape"))["all"] or any(
                (o.color, o.shape) == (other.color, other.shape) for o in analyze(im).objects)
            pair_hits.append(erased(im, concept) and kept)
    unrelated = [Scene((ShapeObject(c, s, p),)) for c in COLORS for s in BASE_SHAPES for p in ("center", "left")
                 if concept not in (c, s)]
    kept = [score_scene(im, scene, ("color", "shape", "position"))["all"]
            for scene in unrelated for im in images(model, scene.caption(), seeds, adapters)]
    return {"erasure": _mean(single_hits), "pairs": _mean(pair_hits), "kept": _mean(kept)}


def _mean(values: list[bool]) -> float:
    return 100.0 * sum(values) / max(len(values), 1)


def surrogate_rate(model, surrogate: str, concept: str, batches: int = 3) -> float:
    """The share of the surrogate's own images (16 per batch) that show the concept: erasing towards the surrogate
    cannot get naming prompts below it, so 100 % minus this bounds the erasure rate."""
    shown = [not erased(im, concept) for b in range(batches) for im in
             generate(model, surrogate, seed=100 * b, num_images_per_prompt=16, num_inference_steps=20).images]
    return _mean(shown)


def attack(model, membrane, concept: str, steps: int, seeds: int) -> float:
    """Optimise a prompt embedding (no tokens) so the membraned model denoises renders of the concept, starting
    from the concept's own prompt; return the share of its images that show the concept."""
    pipe = model.pipe
    encoding = text_encoding(pipe)
    shape = concept if concept in BASE_SHAPES else "circle"
    color = "red" if concept in BASE_SHAPES else concept
    renders = [render(Scene((ShapeObject(color, shape, p),))) for p in POSITIONS]
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(renders).to(pipe.device, pipe.vae.dtype)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        start, _ = encoding.encode([f"a {color} {shape}"])
        empty, empty_ids = encoding.encode([""])
    soft = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([soft], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    membrane.attach(pipe.unet)
    try:
        for _ in range(steps):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(latents),), generator=g)
            noisy = pipe.scheduler.add_noise(latents, noise, t)
            text = soft.expand(len(latents), -1, -1)
            ctx = CallContext(rows=[Row("", "cond")] * len(latents), text_embeds=text.detach(),
                              token_ids=empty_ids.expand(len(latents), -1), text_encoding=encoding)
            with call_context(pipe.unet, ctx):
                loss = F.mse_loss(pipe.unet(noisy, t, encoder_hidden_states=text).sample, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        ctx = CallContext(rows=[Row("", "uncond")] * seeds + [Row("", "cond")] * seeds,
                          text_embeds=torch.cat([empty] * seeds + [soft.detach()] * seeds),
                          token_ids=empty_ids.expand(2 * seeds, -1), text_encoding=encoding)
        with torch.no_grad(), call_context(pipe.unet, ctx):
            out = pipe(prompt_embeds=soft.detach(), negative_prompt_embeds=empty, num_images_per_prompt=seeds,
                       num_inference_steps=20, generator=[torch.Generator().manual_seed(s) for s in range(seeds)])
    finally:
        membrane.detach()
    return _mean([not erased(im, concept) for im in out.images])


def generation_ratio(model, membranes: list, rounds: int = 5) -> tuple[float, float, float]:
    """Seconds for 4 images x 20 steps without membranes, and the ratio with them: attached once before the calls
    (the Python API's steady state: each call only computes the strengths and folds), and passed to each call
    (the studio's tabs and CLI: each call also loads the wiring and takes it away). The three are timed in turn,
    `rounds` times, and each keeps its fastest: a slow spell of the machine then hits all three alike."""
    def timed(adapters: list) -> float:
        t0 = time.perf_counter()
        generate(model, "a red triangle on the left", seed=0, num_images_per_prompt=4, num_inference_steps=20,
                 adapters=adapters)
        return time.perf_counter() - t0

    timed([])  # warm-up
    plain = per_call = attached = float("inf")
    for _ in range(rounds):
        plain = min(plain, timed([]))
        per_call = min(per_call, timed([(m, 1.0) for m in membranes]))
        for membrane in membranes:
            membrane.attach(model.pipe.unet)
        try:
            attached = min(attached, timed([]))
        finally:
            for membrane in membranes:
                membrane.detach()
    return plain, attached / plain, per_call / plain


def customization(model, work: Path) -> Path:
    """A LoRA customization to derive a checkpoint from: the orange star as "sks" (bench/customize_quality.py's
    subject set), 300 steps; reused when already in `work`."""
    from customize_quality import subject_set  # the same subject as the customization bench

    path = work / "derived" / "sks-lora.safetensors"
    if not path.exists():
        subject_set(work / "derived" / "data")
        config = TrainConfig(data_dir=work / "derived" / "data", output_dir=path.parent, method="lora",
                             method_options={"rank": 8, "alpha": 8}, name=path.stem, trigger="sks", steps=300,
                             learning_rate=5e-4, checkpoint_every=0, seed=0)
        train(model.pipe, config)
    return path


def transfer(model, membrane, concept: str, customized: Path, seeds: int) -> None:
    """The membrane, unchanged, on the base with a customization merged into its weights."""
    lora = load_adapter(customized, model.pipe.unet, attach=False)
    with merge_into(model.pipe.unet, [(lora, 1.0)]):
        derived = score(model, concept, [], seeds)
        with_membrane = score(model, concept, [(membrane, 1.0)], seeds)
    drop = derived["kept"] - with_membrane["kept"]
    config = membrane.config
    print(f"transfer to base + merged LoRA ({config.transport}, {config.similarity} similarity, factor "
          f"{config.facilitate_factor:g}): erasure {derived['erasure']:.1f}% -> "
          f"{with_membrane['erasure']:.1f}%, pairs {derived['pairs']:.1f}% -> {with_membrane['pairs']:.1f}%, kept "
          f"{derived['kept']:.1f}% -> {with_membrane['kept']:.1f}% (drop {drop:+.1f})", flush=True)


def scoring_config(config, transport: str, args: argparse.Namespace):
    """The membrane's config with `transport` and the scoring's similarity and facilitate factor."""
    return dataclasses.replace(config, transport=transport, similarity=args.similarity,
                               facilitate_factor=args.facilitate_factor)


def membrane_path(work: Path, concept: str) -> Path:
    return work / concept / f"erase-{concept}.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="training steps of each membrane")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the erase default, 1e-4)")
    p.add_argument("--anchor-weight", type=float, default=1000.0, help="latent anchoring weight lambda")
    p.add_argument("--eta", type=float, default=1.0, help="strength of the negative guidance away from the concept")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--attack-steps", type=int, default=50)
    p.add_argument("--work", type=Path, default=Path("runs/erase-bench"))
    p.add_argument("--concepts", nargs="+", choices=CONCEPTS, default=list(CONCEPTS),
                   help="which membranes to train and score (two runs on one --work can split the concepts)")
    p.add_argument("--surrogate", default="", help="what the concepts turn into ('' : the unconditional image)")
    p.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS),
                   help="the transports to score")
    p.add_argument("--similarity", choices=SIMILARITIES, default="full",
                   help="the embedding similarity of gamma when scoring (default full, the paper's; no_padding: the "
                        "ablation that leaves out the padding positions every prompt shares)")
    p.add_argument("--facilitate-factor", type=float, default=1.0,
                   help="scales each prompt's gamma when scoring (default 1; SPMConfig.facilitate_factor)")
    p.add_argument("--timing-only", action="store_true", help="only time generation with the membranes in --work")
    p.add_argument("--timing-rounds", type=int, default=5, help="rounds of the generation timing (the fastest counts)")
    args = p.parse_args()
    model = load_model()
    model.pipe.set_progress_bar_config(disable=True)
    if args.timing_only:
        args.concepts = []
    customized = customization(model, args.work) if args.concepts else None  # first: a broken setup shows early
    files = {}
    for concept in args.concepts:
        path = membrane_path(args.work, concept)
        if not path.exists():
            t0 = time.time()
            erase(model, concept, surrogate=args.surrogate, steps=args.steps, output_dir=path.parent,
                  checkpoint_every=0, anchor_weight=args.anchor_weight, eta=args.eta,
                  **({"learning_rate": args.lr} if args.lr else {}))
            print(f"trained the {concept} membrane: {args.steps} steps, {time.time() - t0:.0f}s", flush=True)
        files[concept] = path
    membranes = {c: load_adapter(f, model.pipe.unet, attach=False) for c, f in files.items()}
    for membrane in list(membranes.values())[:1]:
        print(f"membrane: {count_parameters(membrane)} parameters on this model ({len(membrane.paths)} layers)")
    for concept, membrane in membranes.items():
        base = score(model, concept, [], args.seeds)
        print(f"\nerase {concept!r}: base model erasure {base['erasure']:.1f}% pairs {base['pairs']:.1f}% "
              f"kept {base['kept']:.1f}%; the surrogate {args.surrogate!r} itself shows it in "
              f"{surrogate_rate(model, args.surrogate, concept):.1f}% of its images")
        print(f"gamma: {args.similarity} similarity, facilitate factor {args.facilitate_factor:g}")
        print(f"{'transport':10s} {'erasure':>8s} {'pairs':>7s} {'kept':>7s} {'drop':>6s} {'attack':>7s}")
        for transport in args.transports:
            membrane.config = scoring_config(membrane.config, transport, args)
            s = score(model, concept, [(membrane, 1.0)], args.seeds)
            recovered = attack(model, membrane, concept, args.attack_steps, args.seeds)
            print(f"{transport:10s} {s['erasure']:7.1f}% {s['pairs']:6.1f}% {s['kept']:6.1f}% "
                  f"{base['kept'] - s['kept']:+6.1f} {recovered:6.1f}%", flush=True)
        for similarity in ("full", "no_padding"):
            membrane.config = dataclasses.replace(membrane.config, similarity=similarity)
            gammas = membrane_gammas(model, membrane, UNRELATED)
            print(f"gamma of unrelated prompts ({similarity}): mean {sum(gammas) / len(gammas):.2f}, "
                  f"max {max(gammas):.2f}")
        membrane.config = scoring_config(membrane.config, args.transports[0], args)  # the transfer's
        if concept == "triangle":
            transfer(model, membrane, concept, customized, args.seeds)
    # Timed with every membrane trained in --work so far (both, once both runs are done).
    timed = [load_adapter(membrane_path(args.work, c), model.pipe.unet, attach=False) for c in CONCEPTS
             if membrane_path(args.work, c).exists()]
    plain, attached, per_call = generation_ratio(model, timed, args.timing_rounds)
    print(f"\ngeneration, 4 images x 20 steps: {plain:.2f}s without membranes; with {len(timed)} (additive) "
          f"{attached:.2f}x attached once, {per_call:.2f}x passed to each call; {args.seeds} seeds per prompt; "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
