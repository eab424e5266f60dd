"""`studio erase`: train an SPM membrane that erases concepts (the command-line face of pipelines.erase).

    studio erase "triangle" --steps 3000 --out runs/no-triangle
    studio erase "van gogh" --concept "starry night" --surrogate "a painting" --anchor-weight 100
    studio generate "a red triangle" --adapter erase-triangle        # gamma is recorded in the PNG

The membrane is added to the adapter library (unless --no-library) like `studio train`'s adapters. Ctrl-C stops
after the current step with a checkpoint; run the same command with --resume latest to continue.
"""

from __future__ import annotations

import argparse

from adapters.spm import SIMILARITIES, TRANSPORTS

from . import train_cli


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("erase", help="erase concepts with an SPM membrane (no images needed)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concept", help="the concept to erase (a word or short phrase)")
    p.add_argument("--concept", dest="more_concepts", action="append", default=[], metavar="CONCEPT",
                   help="another concept for the same membrane (repeatable; they take turns by step)")
    p.add_argument("--surrogate", default="", help="what the concept turns into (default '': erased)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000, the paper's)")
    p.add_argument("--eta", type=float, default=1.0, help="strength of the guidance away from the concept (1.0)")
    p.add_argument("--anchor-weight", type=float, default=1000.0,
                   help="lambda, weight of latent anchoring (default 1000, the paper's on SD 1.4; lower it when "
                        "erasure is too weak on another base)")
    p.add_argument("--anchors", dest="num_anchors", type=int, default=4, help="anchors per step (default 4)")
    p.add_argument("--transport", default="additive", choices=TRANSPORTS,
                   help="how the per-prompt permeability scales the membrane when generating (default additive)")
    p.add_argument("--facilitate-factor", type=float, default=1.0, help="scales the permeability (default 1)")
    p.add_argument("--similarity", default="full", choices=SIMILARITIES,
                   help="full: the paper's 77-token cosine; no_padding: without BOS/EOS/padding positions")
    p.add_argument("--lr", dest="learning_rate", type=float, default=None, help="learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--model", default=None,
                   help="diffusers folder, .safetensors checkpoint or hub id (default: the embedded model)")
    p.add_argument("--out", dest="output_dir", default="runs/erase", help="run folder (default runs/erase)")
    p.add_argument("--name", default=None, help="membrane name (default: erase-<concepts>)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps (default 100)")
    p.add_argument("--sample-prompt", dest="sample_prompts", action="append", default=[],
                   help="prompt sampled at fixed seeds along the way, with the membrane (repeatable)")
    p.add_argument("--no-library", action="store_true", help="do not add the finished membrane to the library")
    p.add_argument("--overwrite", action="store_true", help="replace a library adapter of the same name")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from pipelines.erase import erase_config

    # Checked before the model loads; the tokenizer's checks of the concepts run once it is loaded.
    config = erase_config(
        [args.concept, *args.more_concepts], surrogate=args.surrogate, steps=args.steps, eta=args.eta,
        anchor_weight=args.anchor_weight, num_anchors=args.num_anchors, transport=args.transport,
        facilitate_factor=args.facilitate_factor, similarity=args.similarity, output_dir=args.output_dir,
        name=args.name, resume=args.resume, learning_rate=args.learning_rate, seed=args.seed,
        checkpoint_every=args.checkpoint_every, sample_prompts=args.sample_prompts)
    train_cli.run_config(config, args)
