"""`studio adapters`: the adapter library from the command line (studio.library.AdapterLibrary).

    studio adapters list
    studio adapters show sks
    studio adapters rename sks red-star
    studio adapters delete red-star --yes
    studio adapters list --library runs/lib         # another folder ($STUDIO_ADAPTER_DIR by default)
    studio adapters inspect detail.safetensors      # a LoRA file of another tool: matched / unmatched keys
    studio adapters export sks --format kohya --out sks-kohya.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

# studio.library is imported where it is used: it loads the training engine, which `studio --help` need not.
if TYPE_CHECKING:
    from studio.library import AdapterLibrary


def add_library_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", type=Path, default=None, metavar="DIR",
                   help="adapter library folder (default: $STUDIO_ADAPTER_DIR, else ~/.cache/sd-studio/adapters)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("adapters", help="list, show, rename or delete the library's adapters",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="adapters_command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)  # --library after any command
    add_library_option(common)
    commands.add_parser("list", parents=[common], help="every adapter: name, method, base model, trigger words, date")
    show = commands.add_parser("show", parents=[common], help="one adapter's file, settings and training record")
    show.add_argument("name")
    rename = commands.add_parser("rename", parents=[common], help="rename an adapter (its file)")
    rename.add_argument("old")
    rename.add_argument("new")
    delete = commands.add_parser("delete", parents=[common], help="delete an adapter's file (asks first)")
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    inspect = commands.add_parser("inspect", help="which keys of a LoRA file (kohya, diffusers/peft, legacy) "
                                                  "name modules of the model, and why the others do not")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--model", default=None, help="the model to match against (default: the embedded model)")
    inspect.add_argument("--no-strict", dest="strict", action="store_false",
                         help="skip the header's base-model check (shapes are still checked)")
    export = commands.add_parser("export", parents=[common], help="write an adapter as a LoRA file for other tools")
    export.add_argument("name", help="an adapter of the library, or a studio adapter file")
    export.add_argument("--format", default="kohya", choices=["kohya"], help="kohya/A1111 keys with .alpha")
    export.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    export.add_argument("--rank", type=int, default=None,
                        help="for a weight delta that is not a LoRA (SaRA): the rank of its SVD factorisation")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from studio.library import AdapterEntry, AdapterLibrary, LibraryError

    if args.adapters_command == "inspect":
        _inspect(args)
        return
    library = AdapterLibrary(args.library)
    if args.adapters_command == "export":
        from pipelines.interop import export_lora

        print(export_lora(library.resolve(args.name).path, args.out, format=args.format, rank=args.rank))
    elif args.adapters_command == "list":
        entries = library.list()
        if not entries:
            print(f"the library {library.root} holds no adapters yet: train one with `studio train`")
            return
        rows = [list(AdapterEntry.COLUMNS), *(entry.row() for entry in entries)]
        widths = [max(map(len, column)) for column in zip(*rows)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    elif args.adapters_command == "show":
        _show(library, args.name)
    elif args.adapters_command == "rename":
        print(library.rename(args.old, args.new).path)
    else:
        entry = library.entry(args.name)  # an unknown name fails before the question; a broken file can go
        if not args.yes and not _confirmed(f"delete {entry.name!r} ({entry.path})? [y/N] "):
            raise LibraryError(f"{entry.name!r} not deleted; answer y, or pass --yes")
        library.delete(entry.name)
        print(f"deleted {entry.name!r}")


def _confirmed(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:  # no one to answer (stdin closed, e.g. in a script): no
        return False


def _show(library: AdapterLibrary, name: str) -> None:
    from adapters import read_metadata

    entry = library.get(name)
    meta = read_metadata(entry.path)
    print(f"name: {entry.name}\nfile: {entry.path}\nmethod: {entry.method}\nbase: {entry.base_family} "
          f"(UNet fingerprint {meta.get('studio.base_fingerprint', '?')})\n"
          f"trigger words: {', '.join(entry.trigger_words)}\ncreated: {entry.created.isoformat()}")
    for key, label in (("studio.config", "settings"), ("studio.training", "training")):
        values = json.loads(meta.get(key, "{}"))
        print(f"{label}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
    # What A1111 and ComfyUI show of a LoRA (a file of another tool has only these).
    for key in sorted(k for k in meta if k.startswith(("ss_", "modelspec."))):
        value = meta[key]
        print(f"{key}: {value if len(value) <= 200 else value[:200] + '...'}")


def _inspect(args: argparse.Namespace) -> None:
    import torch

    from pipelines import load_model
    from pipelines.interop import inspect_lora

    model = load_model(args.model, device="cpu", dtype=torch.float32)  # names and shapes only: no GPU needed
    print("\n".join(inspect_lora(args.file, model, strict=args.strict).lines()))
