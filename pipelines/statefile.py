"""Training state on disk without pickle: tensors in one `.safetensors` file, everything else as JSON in its header.

    save_state({"step": 3, "optimizer": opt.state_dict(), "rng": rng_state()}, folder / "state.safetensors")
    state = load_state(folder / "state.safetensors")    # the same nested dicts, lists, tuples, tensors, arrays

`torch.load(..., weights_only=False)` unpickles, and unpickling a crafted file runs its code: a checkpoint
folder copied from someone else is such a file. This format holds exactly what an exact resume needs (nested
dicts with any scalar keys, lists, tuples, tensors, NumPy arrays, numbers, strings, paths, None) and reading it
runs nothing. Files in the old pickle format are refused by `refuse_pickle`, never opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from adapters.io import write_safetensors

from .errors import StudioError

FORMAT = "studio.state/1"  # the header's "format": a later change to the encoding bumps it


class StateFileError(StudioError):
    """A training state file that cannot be read: an old pickle, another format, or a damaged file."""


def save_state(state: Any, path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically (a temporary name, then rename)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "state")
    return write_safetensors(tensors, path, {"format": FORMAT, "structure": json.dumps(structure)})


def load_state(path: str | os.PathLike) -> Any:
    """What `save_state` wrote: tensors on the CPU, tuples as tuples, dict keys with their types."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise StateFileError(f"{path}: not a readable training state file ({e}); the checkpoint is damaged: "
                             "resume from an earlier checkpoint or start a new run") from None
    if meta.get("format") != FORMAT:
        raise StateFileError(f"{path}: header format {meta.get('format')!r}, expected {FORMAT!r}; it was not "
                             "written by this studio: resume from another checkpoint or start a new run")
    try:
        return _decode(json.loads(meta["structure"]), tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise StateFileError(f"{path}: its header's structure is damaged ({e}); resume from an earlier "
                             "checkpoint or start a new run") from None


def refuse_pickle(path: Path, fix: str) -> None:
    """Raise for a state file in the old pickle format (`.pt`) at `path`, without opening it."""
    raise StateFileError(
        f"{path}: checkpoint in the old unsafe pickle format (.pt), which this studio no longer opens because "
        f"loading a pickle can run code hidden in it; {fix}"
    )


# -- the encoding: JSON with tagged containers; tensors and arrays by name into the safetensors body -----------


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # A fresh contiguous copy: safetensors refuses tensors that share storage (views, tied weights).
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if isinstance(value, np.ndarray):  # as raw bytes: safetensors lacks some NumPy dtypes (MT19937's uint32)
        name = f"t{len(tensors)}"
        data = np.ascontiguousarray(value)
        raw = bytearray(data.tobytes())
        tensors[name] = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        return {"ndarray": name, "dtype": data.dtype.str, "shape": list(data.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return {"path": str(value)}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be saved in a training state file")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict) or len(value) not in (1, 3):
        raise ValueError(f"unexpected entry {str(value)[:80]}")
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "ndarray" in value:
        dtype = np.dtype(value["dtype"])
        if dtype.hasobject:  # object arrays would need pickle
            raise ValueError(f"array dtype {value['dtype']!r} is not plain data")
        return np.frombuffer(tensors[value["ndarray"]].numpy().tobytes(), dtype=dtype).reshape(value["shape"]).copy()
    if "path" in value:
        return Path(value["path"])
    if "tuple" in value:
        return tuple(_decode(v, tensors) for v in value["tuple"])
    if "dict" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["dict"]}
    raise ValueError(f"unexpected entry {str(value)[:80]}")
