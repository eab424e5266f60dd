"""Load a Stable Diffusion model from any source the studio accepts, on the right device and dtype.

    load_model()                                    # the embedded Shapes model (assets/shapes-sd)
    load_model("path/to/diffusers-folder")          # a folder written by save_pretrained
    load_model("stabilityai/stable-diffusion-2-1")  # a hub id: the local cache first, the hub if reachable
    load_model("model.safetensors")                 # an original-format SD 1.x/2.x checkpoint, configs local

The source is checked before any weights load; a bad one raises `ModelLoadError` saying what is
wrong and what to do. The family (SD1/SD2/SDXL) is detected once and carried in `LoadedModel`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import SafetensorError, safe_open

from adapters import detect_family

from . import single_file
from .errors import ModelLoadError

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "assets" / "shapes-sd"
PIPELINE_CLASSES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
# "owner/name" as the hub spells repo ids; anything else that does not exist is a wrong path.
HUB_ID = re.compile(r"^\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?$")  # no leading or trailing "." or "-" ("./x" is a path)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A pipeline plus what the studio records about it (family for adapters, name/hash for PNGs)."""

    pipe: DiffusionPipeline
    family: str  # "SD1" | "SD2" | "SDXL", from adapters.detect_family
    source: str  # what was asked for: "embedded", a path or a hub id
    name: str  # short display name (folder or file stem, or the hub id)
    hash: str  # first 10 hex digits of a SHA-256 of the weights (see file_hash, _unet_hash)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators (bf16 where supported: no fp16 overflow), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def load_model(
    source: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    local_files_only: bool | None = None,
    config: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load `source` (None/"embedded", a diffusers folder, a hub id or a single-file checkpoint).

    device: default cuda > mps > cpu. dtype: torch dtype or "fp32"/"fp16"/"bf16"; default
    `default_dtype(device)`. allow_pickle: accept .ckpt/.bin/.pt/.pth checkpoints (pickles can
    run code: only for files you trust). local_files_only: hub ids only; default: the local
    cache first, then the hub unless HF_HUB_OFFLINE is set. config: for a single-file
    checkpoint, a local diffusers folder describing its architecture (default: the SD 1.x/2.x
    configs picked from the checkpoint's shapes; needed for SDXL and non-standard models).
    """
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if source is None or str(source) == "embedded":
        source, path = "embedded", EMBEDDED_MODEL
    elif not str(source).strip():  # Path("") is the working folder: never what an empty field meant
        raise ModelLoadError(
            f"model {str(source)!r} is empty: pass a diffusers folder, a .safetensors checkpoint or a hub id like "
            "'owner/name', or leave it out (None; CLI: no --model) for the embedded model"
        )
    else:
        source = str(source)
        path = Path(source).expanduser()

    if path.is_dir():
        pipe, name, weights_hash = _load_folder(path, dtype), path.resolve().name, _unet_hash(path)
    elif path.is_file():
        pipe, name, weights_hash = _load_single_file(path, dtype, allow_pickle, config), path.stem, file_hash([path])
    elif HUB_ID.match(source) and not single_file.is_single_file(path):
        folder = _download(source, local_files_only)
        pipe, name, weights_hash = _load_folder(folder, dtype), source, _unet_hash(folder)
    else:
        raise ModelLoadError(
            f"model {source!r}: no such file or folder. Pass a diffusers folder, a .safetensors checkpoint, "
            "a hub id like 'owner/name', or leave it empty for the embedded model"
        )
    pipe.to(device)
    # The studio reports progress through generate()'s callback (CLI bar, UI progress), not diffusers' bar.
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, family=detect_family(pipe.unet), source=source, name=name, hash=weights_hash)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"device {device!r} is not a torch device: use cuda, mps or cpu") from e
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ModelLoadError(f"device {device} is not available here: use cpu, or leave it empty for the best one")
    return device


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported: use one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def _pipeline_class(folder: Path) -> type[DiffusionPipeline]:
    """The pipeline class a diffusers folder declares, checked (with its component folders) before loading."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (no model_index.json): pass the folder written by "
            "save_pretrained (it holds model_index.json, unet/, vae/...) or a .safetensors checkpoint"
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{index_file} is not valid JSON ({e}); is the folder complete?") from e
    class_name = index.get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ModelLoadError(
            f"{folder} holds a {class_name}; the studio generates with {' or '.join(PIPELINE_CLASSES)} "
            "(SD 1.x/2.x/SDXL text-to-image): pass such a model"
        )
    missing = [name for name, spec in index.items()
               if isinstance(spec, list) and spec[0] is not None and not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(f"{folder} lacks the component folder(s) {missing}; copy or download the model again")
    return PIPELINE_CLASSES[class_name]


def _load_folder(folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    cls = _pipeline_class(folder)
    _check_weight_files(folder)
    try:
        return cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:  # weights that do not fit their config.json, unreadable files
        reason = " ".join(str(e).split())[:300]
        raise ModelLoadError(
            f"{folder}: the model's weights do not load ({reason}): a config.json that does not match its weights "
            "or an incomplete copy; copy or download the model again"
        ) from e


def _check_weight_files(folder: Path) -> None:
    """Every component's .safetensors file has a complete header and data (a cut download is named here,
    in milliseconds, instead of failing inside diffusers)."""
    for path in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as e:
            raise ModelLoadError(
                f"{path} is not a complete safetensors file ({e}): an interrupted download or copy? "
                "Copy or download the model again"
            ) from e


def _load_single_file(path: Path, dtype: torch.dtype, allow_pickle: bool,
                      config: str | os.PathLike | None) -> DiffusionPipeline:
    if not single_file.is_single_file(path):
        raise ModelLoadError(
            f"{path} is a {path.suffix or 'suffix-less'} file, not a model: pass a .safetensors checkpoint "
            "or a diffusers folder"
        )
    shapes = single_file.read_shapes(path, allow_pickle)
    family = single_file.checkpoint_family(path, shapes)
    if config is not None:
        config = Path(config)
        cls = _pipeline_class(config)
        return cls.from_single_file(str(path), config=str(config), dtype=dtype, local_files_only=True)
    if family not in single_file.CONFIGS:
        raise ModelLoadError(
            f"{path} is {'an SDXL' if family == 'SDXL' else 'a non-standard'} checkpoint; the built-in configs "
            "cover SD 1.x/2.x: pass config= a local diffusers folder of the same architecture"
        )
    in_channels = shapes.get(single_file.UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise ModelLoadError(
            f"{path} has a UNet with {in_channels} input channels (an inpainting or depth model?); "
            "text-to-image needs 4: pass config= a local diffusers folder matching it"
        )
    with tempfile.TemporaryDirectory(prefix="studio-config-") as tmp:
        single_file.write_config(family, Path(tmp))
        return StableDiffusionPipeline.from_single_file(str(path), config=tmp, dtype=dtype,
                                                        local_files_only=True)


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _download(repo_id: str, local_files_only: bool | None) -> Path:
    """The local snapshot folder of a hub model: from the cache, else downloaded when allowed."""
    offline = _hub_offline() if local_files_only is None else local_files_only
    try:
        return Path(DiffusionPipeline.download(repo_id, local_files_only=True))
    except OSError as cached_error:
        if offline:
            raise ModelLoadError(
                f"model {repo_id!r} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1 "
                "or local_files_only=True): download it on a machine with access (`hf download "
                f"{repo_id}`) and copy the cache or the folder here, or pass a local diffusers folder "
                "or .safetensors file"
            ) from cached_error
    try:
        return Path(DiffusionPipeline.download(repo_id, local_files_only=False))
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(
            f"model {repo_id!r} could not be downloaded ({reason}): "
            "check the id and your network, or pass a local diffusers folder or .safetensors file"
        ) from e


def _unet_hash(folder: Path) -> str:
    """A folder's hash covers its UNet weights only: the part adapters bind to, and hashing a
    multi-GB text encoder and VAE on every load would slow big folders down for little gain."""
    unet = folder / "unet"
    return file_hash(sorted(unet.glob("*.safetensors")) or sorted(unet.glob("*.bin")))


def lora_hash(path: Path) -> str:
    """A LoRA file's short hash as A1111 writes it under "Lora hashes": the first 12 hex digits of the SHA-256 of
    a .safetensors file's bytes after its header (the "addnet" hash, so editing the metadata keeps it), or of the
    hash kohya records in `sshs_model_hash` when the header has one (A1111 takes that first)."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size) or b"{}")
        recorded = header.get("__metadata__", {}).get("sshs_model_hash")
        if recorded:
            return recorded[:12]
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:12]


def file_hash(files: list[Path]) -> str:
    """First 10 hex digits of the SHA-256 of the files' bytes, as A1111 shows a "Model hash"."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:10]
