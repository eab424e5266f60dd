"""Adapter files: one `.safetensors` whose header says what it is and which UNet it belongs to.

Header values are strings (nested data JSON-encoded), under three namespaces:
- ours, `studio.*`: method, config, base_family, base_fingerprint, trigger_words, training, version;
- SAI's `modelspec.*` (read by A1111, ComfyUI and other tools): architecture, title, trigger_phrase, date;
- the method's own (`Adapter.header_metadata`), e.g. diffusers' `lora_adapter_metadata` for LoRA.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .base import FORMAT_VERSION, REGISTRY, Adapter, detect_family, unet_fingerprint

# SAI model spec architecture prefixes; SD 2.x's 512 / 768-v variants cannot be told apart from the UNet alone.
MODELSPEC_ARCHITECTURE = {
    "SD1": "stable-diffusion-v1", "SD2": "stable-diffusion-v2", "SDXL": "stable-diffusion-xl-v1-base",
}
# The adapter library's folder (studio/library.py); adapters keep shared state there too (orthogonal LoRA's slots).
ENV_VAR = "STUDIO_ADAPTER_DIR"
DEFAULT_ROOT = Path("~/.cache/sd-studio/adapters")


def default_library_root() -> Path:
    """The adapter library's folder: $STUDIO_ADAPTER_DIR, else ~/.cache/sd-studio/adapters."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter file (its stem), or None: one path component, not empty,
    not hidden (names starting with '.' are the temporary files of atomic writes)."""
    if not name.strip():
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains a slash"
    if name.startswith("."):
        return "starts with '.'"
    return None


def save_adapter(
    adapter: Adapter,
    path: str | os.PathLike,
    *,
    trigger_words: Iterable[str] = (),
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `adapter` to one `.safetensors` file, atomically (temporary name, then rename).

    `training`: the settings that made it (JSON-serialisable); `extra`: more header entries
    (strings kept, anything else JSON-encoded), e.g. kohya `ss_*` or `modelspec.resolution`."""
    if isinstance(trigger_words, str):
        raise TypeError(f"trigger_words must be a list of strings, got the string {trigger_words!r}; wrap it in a list")
    trigger_words = list(trigger_words)
    family, fingerprint = _base_of(adapter)
    path = Path(path)
    header = {
        "studio.method": adapter.method,
        "studio.config": json.dumps(adapter.config_dict(), sort_keys=True),
        "studio.base_family": family,
        "studio.base_fingerprint": fingerprint,
        "studio.trigger_words": json.dumps(trigger_words),
        "studio.training": _json("training", training or {}),
        "studio.version": FORMAT_VERSION,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE[family]}/{adapter.method.replace('_', '-')}",
        "modelspec.title": path.stem,
        "modelspec.trigger_phrase": ", ".join(trigger_words),
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **adapter.header_metadata(),
    }
    for key, value in (extra or {}).items():
        if key in header:
            raise ValueError(f"extra header key {key!r} is written by save_adapter itself; drop it from `extra`")
        header[key] = value if isinstance(value, str) else _json(f"extra[{key!r}]", value)

    tensors = {name: t.detach().cpu().contiguous() for name, t in adapter.tensors().items()}
    return write_safetensors(tensors, path, header)


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a .safetensors file atomically: a temporary name in the same folder, then a rename, so a reader (or a
    crash) never sees half a file and an existing file is replaced only by a complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's header metadata (all strings), without reading any tensor."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_adapter(
    path: str | os.PathLike, unet: nn.Module | None = None, attach: bool = True, *, strict: bool = True
) -> Adapter:
    """Rebuild the adapter saved at `path` (method looked up in REGISTRY); attach it to `unet` if given.

    With a `unet`, the file's base family and fingerprint must match it, checked before any tensor
    is read; `strict=False` skips that check (e.g. an SD 1.5 tuner on an SD 1.5 inpainting UNet),
    and `attach` still refuses shapes that do not fit."""
    meta = read_metadata(path)
    name = Path(path).name
    method = meta.get("studio.method")
    if method is None:
        # Not ours: a kohya / diffusers-peft / legacy diffusers LoRA file of another tool (adapters/foreign.py).
        from .foreign import file_keys, load_foreign_lora, lora_file_format

        if lora_file_format(file_keys(path)):
            if unet is None:
                raise ValueError(f"{name} is a LoRA file of another tool: its module names are resolved against a "
                                 "model, so load it with the model's UNet (load_adapter(path, unet))")
            return load_foreign_lora(path, unet, attach, strict=strict)
        raise ValueError(
            f"{name} has no 'studio.method' header entry: it was not written by save_adapter "
            "(and holds no kohya, diffusers/peft or legacy diffusers LoRA keys)"
        )
    if method not in REGISTRY:
        raise ValueError(f"{name} holds a {method!r} adapter, unknown to this studio; known: {sorted(REGISTRY)}")
    if meta.get("studio.version") != FORMAT_VERSION:
        raise ValueError(
            f"{name} uses adapter format version {meta.get('studio.version')!r}; this studio reads version "
            f"{FORMAT_VERSION!r}: open it with the studio version that wrote it"
        )
    if unet is not None and strict:
        _check_base(name, meta, unet)

    cls = REGISTRY[method]
    config = cls.config_class(**json.loads(meta["studio.config"]))
    tensors = load_file(str(path))
    adapter = cls.from_shapes(config, {key: tuple(t.shape) for key, t in tensors.items()})
    adapter.load_tensors(tensors)
    adapter.read_header(meta)
    adapter.base_family, adapter.base_fingerprint = meta["studio.base_family"], meta["studio.base_fingerprint"]
    if unet is not None and attach:
        adapter.attach(unet)
    return adapter


def _base_of(adapter: Adapter) -> tuple[str, str]:
    """Family and fingerprint of the UNet the adapter sits on, else of the one it was built for."""
    if adapter.unet is not None:
        return detect_family(adapter.unet), unet_fingerprint(adapter.unet)
    if adapter.base_family is None or adapter.base_fingerprint is None:
        raise ValueError(
            f"this {adapter.method} adapter has no base model recorded; build it with from_unet(unet) "
            "or attach it before saving"
        )
    return adapter.base_family, adapter.base_fingerprint


def _check_base(name: str, meta: dict[str, str], unet: nn.Module) -> None:
    want = meta["studio.base_family"], meta["studio.base_fingerprint"]
    have = detect_family(unet), unet_fingerprint(unet)
    if want[0] != have[0]:
        raise ValueError(
            f"{name} was trained on an {want[0]} model (UNet fingerprint {want[1]}), but the loaded model's UNet is "
            f"{have[0]} (fingerprint {have[1]}); load an {want[0]} model first, or pick an adapter made for {have[0]}"
        )
    if want[1] != have[1]:
        raise ValueError(
            f"{name} was trained on an {want[0]} UNet with fingerprint {want[1]}, but the loaded {have[0]} UNet has "
            f"fingerprint {have[1]} (another architecture: its tensors may not line up); load the base model it was "
            "trained on, or pass strict=False to try anyway (shapes are still checked)"
        )


def _json(what: str, value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e
