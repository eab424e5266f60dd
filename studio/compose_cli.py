"""`studio compose`: several concepts in one image, by merged weights or by LoRA-Composer's regions.

    studio compose "a sks and a zkz" --adapter sks --adapter zkz \\
        --region "4,16,28,48:a sks" --region "36,16,60,48:a zkz" --mode both --seed 0 --out out/compose

Adapter k goes in region k (boxes X0,Y0,X1,Y1 in pixels, then the region's prompt). --mode both writes the
composer's images to OUT/composer and the merged-weights images to OUT/merge, for the same seeds.
"""

from __future__ import annotations

import argparse

REGION_FORM = "X0,Y0,X1,Y1:PROMPT"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from . import adapters_cli
    from .cli import add_on_uncond_option, add_run_options, add_sampling_options

    p = sub.add_parser("compose", help="several adapters' concepts in one image (merge, or by region)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the global prompt: the whole scene")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME_OR_FILE[:WEIGHT]", required=True,
                   help="a concept: an adapter of the library (or a file), at WEIGHT (default: 0.6 for orthogonal "
                        "LoRAs and 1 for others when merging, 1 in the composer); repeatable")
    p.add_argument("--region", action="append", default=[], metavar=REGION_FORM,
                   help="a box in pixels and what goes there, with the concept's trigger; the k-th --region holds "
                        "the k-th --adapter; repeatable. Box where the concept goes and leave part of the canvas "
                        "outside every box, to the global prompt (boxes tiling the canvas tend to give one object)")
    p.add_argument("--mode", default="composer", choices=["composer", "merge", "both"],
                   help="composer: LoRA-Composer by region (default); merge: weights summed; both: each")
    add_sampling_options(p)
    p.add_argument("--concept-weight", type=float, default=8.0, help="composer: weight of L_ce (default 8)")
    p.add_argument("--fill-weight", type=float, default=2.0, help="composer: weight of L_fill (default 2)")
    p.add_argument("--region-weight", type=float, default=10.0, help="composer: weight of L_region (default 10)")
    p.add_argument("--step-size", type=float, default=20.0, help="composer: latent update step (default 20, as "
                   "published, and the best measured on the embedded model for subjects trained on their "
                   "captions); a larger step (40, with --early-stop-from 10) helped subjects trained with the "
                   "bare trigger, a weaker binding (docs/benchmarks.md, fusion)")
    p.add_argument("--refine-until", type=int, default=25, help="composer: no latent update from this step on "
                   "(default 25; 0: none)")
    p.add_argument("--early-stop-from", type=int, default=5, help="composer: from this step on, an image's latent "
                   "updates stop for good once its loss rises (default 5, as published)")
    p.add_argument("--no-reinit", dest="reinitialise", action="store_false",
                   help="composer: keep the initial noise as drawn")
    p.add_argument("--no-isolation", dest="isolation", action="store_false",
                   help="composer: let self-attention cross between boxes")
    p.add_argument("--every-delta", action="store_true",
                   help="composer: each concept's other deltas (self-attention, feed-forward, convolutions) act in "
                        "its box too, not only its cross-attention's; for UNet-only LoRAs (docs/methods.md)")
    p.add_argument("--cells", default="inside", choices=["inside", "touched"],
                   help="composer: a box covers the attention cells wholly inside it (default, as published) or "
                        "every cell it touches")
    add_on_uncond_option(p)
    adapters_cli.add_library_option(p)
    add_run_options(p)
    p.set_defaults(run=_compose)


def parse_region_arg(text: str):
    """REGION_FORM -> ComposeRegion."""
    from pipelines import InputError
    from pipelines.compose import ComposeRegion

    box, sep, prompt = text.partition(":")
    try:
        values = tuple(int(v) for v in box.split(","))
    except ValueError:
        values = ()
    if not sep or len(values) != 4:
        raise InputError(f"--region {text!r}: expected {REGION_FORM}, e.g. '0,0,32,64:a sks'")
    return ComposeRegion(values, prompt.strip())


def _compose(args: argparse.Namespace) -> None:
    import secrets
    from pathlib import Path

    from pipelines import check_inputs, load_model, save_images
    from pipelines.attach import split_scale
    from pipelines.compose import ComposerLossWeights, ComposerSettings, compose
    from pipelines.generate import MAX_SEED
    from pipelines.images import check_out_dir
    from studio.library import AdapterLibrary

    from .cli import _progress_bar

    # Refuse bad settings (unknown adapters, malformed regions) before the (possibly slow) model load.
    check_inputs(args.prompt, args.negative, args.height, args.width, args.steps, args.guidance, args.n,
                 args.scheduler, args.seed)
    check_out_dir(args.out)
    library = AdapterLibrary(args.library)
    adapters = [(library.resolve(source).path, weight) for source, weight in map(split_scale, args.adapter)]
    regions = [parse_region_arg(text) for text in args.region]
    settings = ComposerSettings(
        ComposerLossWeights(args.concept_weight, args.fill_weight, args.region_weight), step_size=args.step_size,
        refine_until=args.refine_until, min_refine_steps=args.early_stop_from, reinitialise=args.reinitialise,
        isolation=args.isolation, every_delta=args.every_delta, cells=args.cells)
    modes = ["composer", "merge"] if args.mode == "both" else [args.mode]
    seed = secrets.randbelow(MAX_SEED + 1) if args.seed is None else args.seed  # the same for both modes
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    for mode in modes:
        with _progress_bar(f"composing ({mode})", args.steps) as progress:
            result = compose(model, args.prompt, adapters=adapters, regions=regions, mode=mode,
                             negative_prompt=args.negative, num_inference_steps=args.steps,
                             guidance_scale=args.guidance, seed=seed, width=args.width, height=args.height,
                             num_images_per_prompt=args.n, scheduler=args.scheduler, composer=settings,
                             adapters_on_uncond=args.adapters_on_uncond, callback=progress)
        out = Path(args.out) / mode if len(modes) > 1 else Path(args.out)
        for path in save_images(result, out):
            print(path)
