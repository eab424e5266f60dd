"""`studio checkpoint export`: a model with adapters merged, as one original-layout single-file checkpoint
(the command-line face of pipelines.export).

    studio checkpoint export --adapter sks:0.8 --out out/shapes-sks.safetensors
    studio checkpoint export --model base.safetensors --adapter style.safetensors:0.6 --out merged.safetensors

SD 1.x, SD 2.x and SDXL models are written in their original layouts (SD 2.x: the OpenCLIP text encoder as
cond_stage_model.model.*; SDXL: both text encoders under conditioner.embedders.*). The file opens in A1111 and
ComfyUI, in diffusers' `from_single_file` (with a config folder for non-standard layouts) and in
`studio generate --model` (SDXL, and any non-standard layout: with --config, a local diffusers folder of the
model). Text-encoder parts of other tools' LoRA files (kohya lora_te_, SDXL lora_te1_/lora_te2_) are merged
into the matching encoder. Its header lists the merged adapters with their short hashes.
"""

from __future__ import annotations

import argparse

from . import adapters_cli


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("checkpoint", help="export a model with merged adapters as a single-file checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="checkpoint_command", required=True, metavar="COMMAND")
    export = commands.add_parser("export", help="write base + merged adapters as one .safetensors (original SD layout)",
                                 description="Write the model (SD 1.x, SD 2.x or SDXL) with the adapters merged as "
                                             "one single-file .safetensors in the original Stable Diffusion layout, "
                                             "read by A1111, ComfyUI and diffusers' from_single_file.")
    export.add_argument("--model", default=None,
                        help="diffusers folder, .safetensors checkpoint or hub id (default: the embedded model)")
    export.add_argument("--config", default=None,
                        help="for a single-file --model of SDXL or a non-standard layout: its local diffusers folder")
    export.add_argument("--adapter", action="append", default=[], metavar="NAME_OR_FILE[:SCALE]",
                        help="an adapter of the library (or a LoRA file of any tool) merged at SCALE (default 1); "
                             "repeatable")
    adapters_cli.add_library_option(export)
    export.add_argument("--out", required=True, help="the checkpoint to write, ending in .safetensors")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--title", default=None, help="modelspec.title in the header (default: the file's name)")
    export.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="precision of the weights written (default float32; merged in fp32 either way)")
    export.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from pipelines import check_adapters, load_model, parse_adapter_arg
    from pipelines.export import check_export_target, export_checkpoint
    from studio.library import AdapterLibrary

    # Refuse a bad --out and unknown adapters before the (possibly slow) model load.
    check_export_target(args.out, args.overwrite)
    library = AdapterLibrary(args.library)
    adapters = [(library.resolve(source).path, scale) for source, scale in map(parse_adapter_arg, args.adapter)]
    check_adapters(adapters)
    model = load_model(args.model, device="cpu", dtype=args.dtype, config=args.config)
    print(export_checkpoint(model, args.out, adapters, overwrite=args.overwrite, title=args.title))
