"""The `studio` command line: one subcommand per job, each a thin call into pipelines/.

    studio generate "a red circle" --seed 1 --out out/
    studio edit photo.png --source "a red circle" --target "a blue circle" --out out/edit
    studio edit photo.png --source "a red circle" --target "a sks circle" --adapter sks:0.8   # with an adapter
    studio train --data data/stars --method sc_tuner --trigger sks --steps 200
    studio erase "triangle" --steps 3000 --out runs/no-triangle       # an SPM membrane, into the library
    studio generate "sks star" --adapter sks:0.8          # an adapter of the library (or a file), scale 0.8
    studio generate "a red star" --adapter star-canny --control canny:photo.png:0.8   # a CSC-Tuner's control
    studio annotate data/stars --condition canny --out data/stars-canny              # hints for training
    studio compose "a sks and a zkz" --adapter sks --adapter zkz --region "0,0,32,64:a sks" --region "32,0,64,64:a zkz"
    studio adapters list
    studio checkpoint export --adapter sks:0.8 --out out/shapes-sks.safetensors   # one single-file model
    studio jobs submit batch.yaml                     # many subjects, resumable (docs/jobs.md)
    studio shapes dataset --out data/shapes --n 100 --seed 0         # renders + captions to train on
    studio shapes train --out runs/shapes

A refused input exits with status 2 and one line `error: ...` (no traceback), like argparse's own
errors. A new job adds a `_add_<name>` function (or a module with `add_parser`, as train_cli.py) and one
line in `build_parser`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .quiet import quiet_libraries

quiet_libraries()  # before pipelines imports diffusers and transformers: their chatter is not the user's business

from pipelines import ANNOTATORS, SCHEDULERS, StudioError  # noqa: E402

from . import adapters_cli, checkpoint_cli, compose_cli, erase_cli, jobs_cli, train_cli  # noqa: E402


def add_on_uncond_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-adapters-on-uncond", dest="adapters_on_uncond", action="store_false",
                   help="keep the adapters off the unconditional (negative prompt) branch, as A1111's Composable "
                        "LoRA without 'Use LoRA in uncond': guidance then amplifies all they add (docs/methods.md)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Which model runs where, and the output folder: the options every image-making command shares."""
    p.add_argument("--model", default=None,
                   help="diffusers folder, .safetensors checkpoint or hub id (default: the embedded model)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights' precision (default: bf16/fp16 on GPUs, float32 on CPU; float32 if images turn black)")
    p.add_argument("--out", default="out", help="output folder (default out/)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="text-to-image; saves PNGs with their settings",
                       description="Generate images and save them as PNGs carrying their settings (A1111 style).")
    p.add_argument("prompt")
    add_sampling_options(p)
    _add_adapter_options(p)
    add_on_uncond_option(p)
    p.add_argument("--control", action="append", default=[], metavar="CONDITION:IMAGE[:SCALE]",
                   help="control the image with IMAGE through the CSC-Tuner of CONDITION given by --adapter "
                        "(canny, color, sketch...), at SCALE (default: the tuner's); repeatable")
    p.add_argument("--no-annotate", dest="annotate", action="store_false",
                   help="the control images already are hints (e.g. an edge map): do not run the annotator")
    add_run_options(p)
    p.set_defaults(run=_generate)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The options of a text-to-image job, as `generate` names them (also `studio compose`'s)."""
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=None, help="seed of image 1; image i uses seed+i-1 (default random)")
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--scheduler", default="DDIM", choices=list(SCHEDULERS), help="sampler (default DDIM)")


def _add_adapter_options(p: argparse.ArgumentParser) -> None:
    """--adapter (repeatable) and --library, read by `_library_adapters` (generate's and edit's)."""
    p.add_argument("--adapter", action="append", default=[], metavar="NAME_OR_FILE[:SCALE]",
                   help="an adapter of the library (or an adapter file) at SCALE (default 1); repeatable")
    adapters_cli.add_library_option(p)


def _library_adapters(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """The --adapter options as (file, scale) pairs, a name looked up in --library; an unknown name, a missing file
    or a bad scale is refused here, in one line naming it, before the (possibly slow) model load."""
    from pipelines import check_adapters, parse_adapter_arg
    from studio.library import AdapterLibrary

    library = AdapterLibrary(args.library)
    adapters = [(library.resolve(source).path, scale) for source, scale in map(parse_adapter_arg, args.adapter)]
    check_adapters(adapters)
    return adapters


def _generate(args: argparse.Namespace) -> None:
    from pipelines import check_inputs, generate, load_model, save_images
    from pipelines.control import parse_control_arg
    from pipelines.images import check_out_dir

    # Refuse bad settings (and unknown adapters) before the (possibly slow) model load.
    check_inputs(args.prompt, args.negative, args.height, args.width, args.steps, args.guidance, args.n,
                 args.scheduler, args.seed)
    check_out_dir(args.out)
    adapters = _library_adapters(args)
    control = [dataclasses.replace(parse_control_arg(text), annotate=args.annotate) for text in args.control]
    _check_controllers(control, [path for path, _ in adapters])
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    with _progress_bar("generating", args.steps) as progress:
        result = generate(model, args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, seed=args.seed, width=args.width, height=args.height,
                          num_images_per_prompt=args.n, scheduler=args.scheduler, adapters=adapters,
                          adapters_on_uncond=args.adapters_on_uncond, control=control, callback=progress)
    for path in save_images(result, args.out):
        print(path)


def _check_controllers(control: list, adapter_files: list) -> None:
    """Every --control has a readable image and a CSC-Tuner of its condition among the --adapter files."""
    from adapters import read_metadata
    from pipelines import InputError
    from pipelines.control import controller_condition, is_controller
    from pipelines.images import load_image

    conditions = [controller_condition(path) for path in adapter_files
                  if is_controller(read_metadata(path).get("studio.method"))]
    for spec in control:
        load_image(spec.image)  # a missing or unreadable file is refused now, not after the model load
        if spec.condition not in conditions:
            raise InputError(f"--control {spec.condition}:{spec.image}: no {spec.condition!r} CSC-Tuner among the "
                             f"--adapter files ({', '.join(conditions) or 'none'} given); add --adapter with a "
                             f"controller trained on {spec.condition!r} hints")
    unused = sorted(set(conditions) - {spec.condition for spec in control})
    if unused:
        raise InputError(f"--adapter gives CSC-Tuner(s) for {unused} but no --control image for them; add "
                         f"--control {unused[0]}:IMAGE, or leave the controller out")


def _add_annotate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotate", help="draw control hints (canny, color, sketch) for a folder of images",
                       description="Write the hint of every image of FOLDER (subfolders mirrored) into --out, "
                                   "for training a CSC-Tuner with --hint-dir or for inspecting what it will see.")
    p.add_argument("folder", metavar="FOLDER", help="the training images")
    p.add_argument("--condition", required=True, choices=list(ANNOTATORS), help="which annotator")
    p.add_argument("--out", required=True, help="folder for the hints (outside FOLDER)")
    p.add_argument("--resolution", type=int, default=None,
                   help="crop and resize as training at this resolution first (default: each image's size)")
    p.set_defaults(run=_annotate)


def _annotate(args: argparse.Namespace) -> None:
    from pipelines import build_control_pairs

    for _, hint in build_control_pairs(args.folder, args.condition, args.out, resolution=args.resolution):
        print(hint)


def _add_edit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="edit a real image from a source to a target prompt (UAM)",
                       description="Invert IMAGE and edit it from the source prompt to the target prompt with "
                                   "uniform attention maps; writes edited.png (with its settings), "
                                   "reconstruction.png and mask.png to --out.")
    p.add_argument("image", metavar="IMAGE", help="the image to edit (PNG, JPEG, WebP...)")
    p.add_argument("--source", required=True, help="a prompt describing IMAGE as it is")
    p.add_argument("--target", required=True, help="the same prompt, changed where the image should change")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps, inversion and editing each (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale of the source and target (default 7.5)")
    p.add_argument("--mask-start", type=int, default=200,
                   help="T_mask: blend the kept regions only on timesteps below it (default 200; 0: never)")
    p.add_argument("--quantile", type=float, default=0.25,
                   help="the mask threshold's quantile level (default 0.25; the paper's 0.5 misses background edits)")
    p.add_argument("--dilation", type=int, default=1, help="radius of the mask's dilation (default 1)")
    p.add_argument("--mask-floor", type=float, default=0.8,
                   help="a latent change up to this never counts as an edit, so guidance's faint tone shift "
                        "leaves the background alone (default 0.8; 0: the reference's rule)")
    p.add_argument("--threshold-mode", default="reference", choices=["reference", "paper"],
                   help="reference: the reference code's |Δ| > 2λ (default); paper: |Δ| > λ")
    p.add_argument("--no-source-blend", dest="source_blend", action="store_false",
                   help="blend only the target branch (default: also the source, as the reference code)")
    p.add_argument("--mask", default=None,
                   help="image whose white (or opaque) part limits the edit (default: no limit)")
    _add_adapter_options(p)
    add_run_options(p)
    p.set_defaults(run=_edit)


def _edit(args: argparse.Namespace) -> None:
    from pipelines import check_edit_inputs, edit, load_model, save_edit
    from pipelines.edit import check_edit_adapters
    from pipelines.images import check_out_dir, load_image, load_mask

    # Refuse bad settings and unreadable files before the (possibly slow) model load.
    check_edit_inputs(args.source, args.target, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      mask_start_t=args.mask_start, quantile=args.quantile, dilation=args.dilation,
                      threshold_mode=args.threshold_mode, mask_floor=args.mask_floor)
    check_out_dir(args.out)
    image = load_image(args.image)
    user_mask = None if args.mask is None else load_mask(args.mask, image.size)
    if args.mask is not None and user_mask is None:
        warnings.warn(f"--mask {args.mask} is empty (nothing white or opaque): editing without a limit", stacklevel=1)
    adapters = _library_adapters(args)
    check_edit_adapters(adapters)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    with _progress_bar("inverting and editing", 2 * args.steps) as progress:
        result = edit(model, image, args.source, args.target, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, mask_start_t=args.mask_start, quantile=args.quantile,
                      dilation=args.dilation, threshold_mode=args.threshold_mode, mask_floor=args.mask_floor,
                      source_blend=args.source_blend, user_mask=user_mask, adapters=adapters, callback=progress)
    for path in save_edit(result, args.out).values():
        print(path)


@contextlib.contextmanager
def _progress_bar(desc: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr driven by the pipelines' callback(step, total)."""
    from tqdm import tqdm

    # delay: the bar appears only once the model runs, so a refused input prints just its error.
    with tqdm(total=total, desc=desc, unit="step", file=sys.stderr, delay=0.1) as bar:
        def progress(step: int, total: int) -> None:
            bar.total = total  # an edit whose inversion is cached runs fewer steps than announced
            bar.update(step - bar.n)

        yield progress


def _add_shapes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shapes", help="the Shapes world: write datasets, train the embedded model")
    shapes = p.add_subparsers(dest="shapes_command", required=True, metavar="COMMAND")
    # Every argument goes to the subcommand's module (its own --help included): prefix_chars that no
    # argument starts with stop argparse from reading "--out" as an option of this parser.
    dataset = shapes.add_parser("dataset", help="write seeded renders with .txt captions "
                                "(see `studio shapes dataset --help`)", add_help=False, prefix_chars="\0")
    dataset.add_argument("args", nargs="*")
    dataset.set_defaults(run=_shapes_dataset)
    train = shapes.add_parser("train", help="train the Shapes model (see `studio shapes train --help`)",
                              add_help=False, prefix_chars="\0")
    train.add_argument("args", nargs="*")
    train.set_defaults(run=_shapes_train)


def _shapes_dataset(args: argparse.Namespace) -> None:
    from studio.shapes.dataset import main

    main(args.args)


def _shapes_train(args: argparse.Namespace) -> None:
    from studio.shapes.train import main

    main(args.args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="Stable Diffusion customization studio.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_edit(sub)
    _add_annotate(sub)
    train_cli.add_parser(sub)
    erase_cli.add_parser(sub)
    jobs_cli.add_parser(sub)
    compose_cli.add_parser(sub)
    adapters_cli.add_parser(sub)
    checkpoint_cli.add_parser(sub)
    _add_shapes(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            # Our own warnings (a truncated prompt...) are for the user: show them as plain lines.
            warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
            args.run(args)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # the shell's convention for Ctrl-C
    return 0


if __name__ == "__main__":
    sys.exit(main())
