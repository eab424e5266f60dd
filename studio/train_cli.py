"""`studio train`: train an adapter on a folder of images (the command-line face of pipelines.train).

    studio train --data data/stars --method sc_tuner --trigger sks --steps 200 --out runs/stars
    studio train --config stars.yaml --steps 400 --resume latest      # the file's settings, flags win
    studio train --data data/stars --method lora --option rank=8 --option target=attn_conv
    studio train --data data/stars --method csc_tuner --option condition=canny --steps 1000   # a controller
    accelerate launch --multi_gpu -m studio.cli train --config stars.yaml

The config file's keys are TrainConfig's fields. The finished adapter is added to the adapter
library (unless --no-library). Ctrl-C stops after the current step with a checkpoint; run the
same command with --resume latest to continue.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from pipelines.train import TrainConfig

# Flags that set a TrainConfig field keep argparse.SUPPRESS as default: only the flags given
# reach the config, so a config file's values stand unless overridden.
_UNSET = argparse.SUPPRESS


def method_options_help() -> str:
    """Every method's --option keys, from the metadata of its config dataclass (help, choices, range, default)."""
    from adapters import REGISTRY
    from adapters.base import choice_values

    lines = ["method options (--option KEY=VALUE, or method_options in a config file):"]
    for method in sorted(REGISTRY):
        cls = REGISTRY[method]
        lines.append(f"  {method} ({cls.label}): {cls.summary}")
        for field in dataclasses.fields(cls.config_class):
            meta = field.metadata
            if "help" not in meta:
                continue
            rules = []
            if meta["choices"]:
                rules.append("one of " + ", ".join(map(str, choice_values(meta["choices"]))))
            if meta["minimum"] is not None:
                rules.append(f">= {meta['minimum']:g}")
            if meta["maximum"] is not None:
                rules.append(f"<= {meta['maximum']:g}")
            if meta["from_model"]:
                rules.append("read from the model")
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            rules.append(f"default {default}")
            lines.append(f"    {field.name}: {meta['help']} ({'; '.join(rules)})")
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train an adapter (SC-Tuner, LoRA, ...) on a folder of images",
                              description=__doc__, epilog=method_options_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML or TOML file of training settings; flags override it")
    p.add_argument("--model", default=None,
                   help="diffusers folder, .safetensors checkpoint or hub id (default: the embedded model)")
    p.add_argument("--no-library", action="store_true", help="do not add the finished adapter to the library")
    p.add_argument("--overwrite", action="store_true", help="replace a library adapter of the same name")

    data = p.add_argument_group("data")
    data.add_argument("--data", dest="data_dir", default=_UNSET, help="folder of training images (and captions)")
    data.add_argument("--trigger", default=_UNSET, help="trigger word; the caption of images without one")
    data.add_argument("--class-prompt", default=_UNSET, help="the subject's class ('star'), for prior preservation")
    data.add_argument("--class-dir", default=_UNSET, help="class images (default OUT/class_images)")
    data.add_argument("--hint-dir", default=_UNSET,
                      help="csc_tuner: ready hints mirroring --data (`studio annotate` writes them); default: "
                           "drawn by the condition's annotator while training")
    data.add_argument("--num-class-images", type=int, default=_UNSET, help="> 0: prior preservation (default 0)")
    data.add_argument("--prior-loss-weight", type=float, default=_UNSET, help="default 1.0")
    data.add_argument("--prior-caption-dropout", type=float, default=_UNSET,
                      help="share of class images trained with the empty caption: keeps the unconditional "
                           "branch on the base model (default 0)")
    data.add_argument("--instance-prompt", default=_UNSET,
                      help="DreamBooth's instance prompt, e.g. 'a sks' (default: '<trigger> <class prompt>')")
    data.add_argument("--instance-prompt-share", type=float, default=_UNSET,
                      help="share of images trained on the instance prompt instead of their caption: the trigger "
                           "alone then draws the subject (default 0)")
    data.add_argument("--masked-loss", action="store_const", const=True, default=_UNSET,
                      help="learn only the masked part of each image (kohya's --masked_loss): masks from "
                           "--mask-dir, else the images' transparency")
    data.add_argument("--mask-dir", default=_UNSET,
                      help="with --masked-loss: one mask per image, same name (white: learn, black: ignore)")
    data.add_argument("--caption-dropout", type=float, default=_UNSET,
                      help="share of images trained with the empty caption (default: the method's, 0.5 for a "
                           "controller, else 0)")

    method = p.add_argument_group("method and optimisation")
    method.add_argument("--method", default=_UNSET,
                        help="adapter method (default sc_tuner); its options are listed below")
    method.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. --option rank=8 (repeatable; merged into the file's)")
    method.add_argument("--steps", type=int, default=_UNSET, help="optimizer steps (default 200)")
    method.add_argument("--batch-size", type=int, default=_UNSET, help="default 1")
    method.add_argument("--grad-accum", dest="gradient_accumulation_steps", type=int, default=_UNSET,
                        help="gradient accumulation steps (default 1)")
    method.add_argument("--lr", dest="learning_rate", type=float, default=_UNSET,
                        help="learning rate (default: the method's own, else 1e-4)")
    method.add_argument("--lr-scheduler", default=_UNSET, help="constant (default), constant_with_warmup, cosine...")
    method.add_argument("--warmup-steps", type=int, default=_UNSET, help="default 0")
    method.add_argument("--mixed-precision", default=_UNSET,
                        help="no, fp16 or bf16 (default: from the model's dtype and the hardware)")
    method.add_argument("--gradient-checkpointing", action="store_const", const=True, default=_UNSET,
                        help="trade ~30%% more time for less activation memory")
    method.add_argument("--seed", type=int, default=_UNSET, help="default 0")

    run_group = p.add_argument_group("outputs")
    run_group.add_argument("--out", dest="output_dir", default=_UNSET, help="run folder (default runs/train)")
    run_group.add_argument("--name", default=_UNSET, help="adapter name (default: the trigger word)")
    run_group.add_argument("--resume", default=_UNSET, help="'latest' or a checkpoint folder")
    run_group.add_argument("--checkpoint-every", type=int, default=_UNSET, help="steps (default 100)")
    run_group.add_argument("--keep-last", type=int, default=_UNSET, help="checkpoints kept (default 2)")
    run_group.add_argument("--sample-prompt", dest="sample_prompts", action="append", default=_UNSET,
                           help="prompt sampled at fixed seeds along the way (repeatable)")
    run_group.add_argument("--sample-seed", dest="sample_seeds", type=int, action="append", default=_UNSET,
                           help="seed of the samples (repeatable; default 0)")
    run_group.add_argument("--sample-every", type=int, default=_UNSET, help="steps (default: start and end only)")
    p.set_defaults(run=run)
    return p


def parse_option(text: str) -> tuple[str, object]:
    """`rank=8` -> ("rank", 8): the value is read as YAML, so numbers and true/false get their types."""
    from pipelines.train import TrainConfigError

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise TrainConfigError(f"--option {text!r}: expected KEY=VALUE, e.g. --option rank=8")
    return key.strip(), yaml.safe_load(value)


def build_config(args: argparse.Namespace):
    """The TrainConfig of the file (if any) with the flags on top; --option entries merge into method_options."""
    from pipelines.train import TrainConfig, read_config_file

    values = read_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    if args.option:
        values["method_options"] = {**values.get("method_options", {}), **dict(map(parse_option, args.option))}
    return TrainConfig.from_dict(values, source=str(args.config or "command line"))


def run(args: argparse.Namespace) -> None:
    run_config(build_config(args), args)


def run_config(config: TrainConfig, args: argparse.Namespace) -> None:
    """Train `config` (a checked TrainConfig) on args.model with a progress bar and Ctrl-C as a clean stop, and add
    the adapter to the library unless args.no_library (also `studio erase`'s run)."""
    from accelerate import PartialState
    from tqdm import tqdm

    from pipelines import load_model
    from pipelines.train import TrainingDiverged, TrainProgress, train
    from studio.library import AdapterLibrary, LibraryError

    # Refuse bad settings before the (possibly slow) model load, the library clash included.
    state = PartialState()  # under `accelerate launch`: this process's GPU
    library = None if args.no_library or not state.is_main_process else AdapterLibrary()
    if library is not None and not args.overwrite and config.adapter_name in library:
        raise LibraryError(f"the adapter library ({library.root}) already holds {config.adapter_name!r}; "
                           "pass --name to pick another, --overwrite to replace it, or --no-library")
    model = load_model(args.model, device=state.device)

    stop = threading.Event()
    with tqdm(total=config.steps, desc="training", unit="step", file=sys.stderr, disable=not state.is_main_process,
              delay=0.1) as bar:
        def progress(p: TrainProgress) -> None:
            bar.update(p.step - bar.n)
            if p.loss is not None:
                bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.learning_rate:.2g}")
            for path in ([p.samples[0].parent] if p.samples else []) + ([p.checkpoint] if p.checkpoint else []):
                bar.write(str(path))

        def on_ctrl_c(signum, frame) -> None:
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
            bar.write("stopping after this step with a checkpoint (Ctrl-C again to abort)")

        previous = signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            result = train(model.pipe, config, progress=progress, should_stop=stop.is_set)
        except TrainingDiverged as e:
            raise SystemExit(f"error: {e}") from e
        finally:
            signal.signal(signal.SIGINT, previous)

    if result.cancelled:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}; continue with --resume latest")
        return
    print(result.adapter_path)
    if library is not None:
        print(f"added to the library as {library.add(result.adapter_path, overwrite=args.overwrite).name!r}")
