"""Orthogonal LoRA (Po et al., "Orthogonal Adaptation for Modular Customization of Diffusion Models", CVPR 2024,
arXiv 2312.02432, sec. 3): a LoRA whose down-projection A is frozen to columns of a shared orthogonal basis, so
that concepts trained apart merge by plain addition without crosstalk.

Per input width n there is one seeded n x n orthogonal matrix O_n, the same for every concept. Concept i has
A_i = O_n[:, cols_i]ᵀ, frozen, and trains only B_i (from zero). Disjoint columns give A_i A_jᵀ = 0, hence
ΔW_i ΔW_jᵀ = B_i A_i A_jᵀ B_jᵀ = 0: concept j's update ignores the inputs concept i reads. (The paper names the
frozen factor B; here the names are peft's: A is the down-projection.)

Which columns (`OrthoLoRAConfig.columns`):
- "slot": concept k takes π_n[k·r:(k+1)·r] of a seeded permutation π_n: exactly orthogonal for n // r concepts
  per width. `SlotRegistry`, kept in the adapter library's folder, hands each training run its own slot.
- "random": r columns drawn from (seed, n, slot), as the paper does: orthogonal only where draws do not collide.
Past a width's capacity a slot falls back to random columns for that width; the header records it as partial.

Files are plain diffusers LoRA files plus a `studio.ortho` header entry. Each carries its own frozen A, so
loading needs no basis; only training builds one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import option, register
from .checks import is_int
from .lora import LoRA, LoRAConfig

COLUMN_MODES = ("slot", "random")
ORTHO_TARGETS = ("attn", "attn_ff")  # Linear layers only: the bases are per input width
SLOTS_DIR = ".ortho-slots"  # in the adapter library's folder; hidden, so the library lists no such entry
CHECKSUM_ROUNDING = 1e-9  # basis_checksum's grid: LAPACK builds that differ in the last bits still agree


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from `key` through sha256: the same stream on every machine and process
    (Python's own hash() of a string changes per process)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@functools.lru_cache(maxsize=8)
def _cached_basis(n: int, seed: int) -> torch.Tensor:
    gaussian = torch.randn(n, n, generator=_generator("basis", seed, n), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # QR is unique only up to the signs of Q's columns; making diag(R) > 0 fixes them on every LAPACK build.
    return q * torch.sign(torch.diagonal(r))


def orthogonal_basis(n: int, seed: int) -> torch.Tensor:
    """O_n: the QR factor of a seeded n x n Gaussian, on CPU in float64, with diag(R) > 0 (cached; a copy is
    returned, so callers may modify it)."""
    if not is_int(n, 1) or not is_int(seed, 0):
        raise ValueError(f"orthogonal_basis needs an integer width n >= 1 and seed >= 0, got n={n!r}, seed={seed!r}")
    return _cached_basis(n, seed).clone()


def basis_checksum(basis: torch.Tensor) -> str:
    """The first 16 hex digits of the sha256 of `basis` rounded to 1e-9."""
    grid = torch.round(basis.detach().double().cpu() / CHECKSUM_ROUNDING).to(torch.int64)
    return hashlib.sha256(grid.numpy().astype("<i8").tobytes()).hexdigest()[:16]


def choose_columns(n: int, rank: int, *, seed: int, columns: str, slot: int | None) -> tuple[torch.Tensor, bool]:
    """(the `rank` column indices of O_n a concept takes, whether they are drawn at random), for input width n.

    Slot k takes block k of the seeded permutation π_n while k < n // rank (exactly orthogonal to every other
    slot); otherwise, and in "random" mode, the columns are a draw seeded by (seed, n, slot), which may share
    columns with another concept's."""
    if columns == "slot" and slot is not None and slot < n // rank:
        order = torch.randperm(n, generator=_generator("permutation", seed, n))
        return order[slot * rank:(slot + 1) * rank], False
    return torch.randperm(n, generator=_generator("random", seed, n, slot or 0))[:rank], True


@dataclass
class OrthoLoRAConfig(LoRAConfig):
    # No field is in the Train tab yet (ui=False): its /train API takes every shown option by position, so new
    # shown options would shift the callers' values.
    rank: int = option(4, "rank r of each update (the paper uses 20 on SD 1.5: 320 // 20 = 16 concepts fit)",
                       minimum=1, maximum=1024)
    target: str = option("attn", "the layers adapted (Linear layers only)", choices=(
        ("attention (q, k, v, out)", "attn"), ("attention + feed-forward", "attn_ff")))
    seed: int = option(0, "seed of the shared orthogonal bases: concepts meant to merge must share it", minimum=0)
    columns: str = option("slot", "which basis columns a concept takes", choices=(
        ("a slot of its own (exactly orthogonal)", "slot"), ("random columns (the paper's)", "random")))
    slot: int | None = option(None, "the concept's slot (blank: claimed from the adapter library when training "
                                    "starts); in random mode it seeds the draw, so give each concept its own "
                                    "(blank draws as slot 0)", minimum=0)

    def __post_init__(self) -> None:
        if self.target not in ORTHO_TARGETS:
            raise ValueError(
                f"OrthoLoRAConfig.target must be one of {ORTHO_TARGETS}, got {self.target!r}: the orthogonal bases "
                "are per input width of Linear layers, and a convolution's down-projection is not one; use 'attn' "
                "or 'attn_ff', or a plain LoRA (method 'lora') for convolutions")
        super().__post_init__()
        if not is_int(self.seed, 0):
            raise ValueError(f"OrthoLoRAConfig.seed must be an integer >= 0, got {self.seed!r}")
        if self.columns not in COLUMN_MODES:
            raise ValueError(f"OrthoLoRAConfig.columns must be one of {COLUMN_MODES}, got {self.columns!r}")
        if self.slot is not None and not is_int(self.slot, 0):
            raise ValueError(f"OrthoLoRAConfig.slot must be an integer >= 0 or blank, got {self.slot!r}")


@dataclass(frozen=True)
class WidthBasis:
    """What an orthogonal LoRA records per input width (the `studio.ortho` header's "widths")."""

    checksum: str  # basis_checksum(O_n) of the basis its A was cut from
    capacity: int  # slots with exactly orthogonal columns at this width: n // r
    partial: bool  # the columns were drawn at random (random mode, or a slot past capacity)


@register
class OrthoLoRA(LoRA):
    """A LoRA with `lora_A` frozen to basis columns (`requires_grad=False`, never in `trainable_parameters()`)."""

    method = "ortho_lora"
    config_class = OrthoLoRAConfig
    label = "Orthogonal LoRA"
    summary = ("LoRA whose down-projection is frozen to a slot of a shared orthogonal basis, so concepts trained "
               "apart merge by plain addition without crosstalk; files load in diffusers as plain LoRAs.")
    default_merge_weight = 0.6  # every concept merged at λ = 0.6, unnormalised, as Po et al. merge (arXiv 2312.02432)
    recommended_for = {}  # LoRA's recommendation was measured for LoRA, not for this method

    def __init__(self, config: OrthoLoRAConfig, shapes: dict[str, tuple[int, int]]):
        super().__init__(config, shapes)
        for down in self.lora_A.values():
            down.weight.requires_grad_(False)
        self.widths: dict[int, WidthBasis] = {}  # input width -> its basis record; from_unet or the file's header

    @classmethod
    def from_unet(cls, unet: nn.Module, config: OrthoLoRAConfig | None = None) -> OrthoLoRA:
        config = config or OrthoLoRAConfig()
        if config.columns == "slot" and config.slot is None:
            raise ValueError(
                "OrthoLoRAConfig.slot is blank: training claims one from the adapter library (SlotRegistry); "
                "outside training claim one with SlotRegistry(library).claim(seed, owner), or set slot=K")
        adapter = super().from_unet(unet, config)
        adapter._cut_down_projections()
        return adapter

    def _cut_down_projections(self) -> None:
        """A = O_n[:, cols].T in fp32 for every layer of input width n (one basis and one column choice per width)."""
        config = self.config
        by_width: dict[int, list[str]] = {}
        for key, path in self.paths.items():
            by_width.setdefault(self.shapes[path][0], []).append(key)
        for n, keys in sorted(by_width.items()):
            if config.rank > n:
                raise ValueError(f"rank {config.rank} exceeds the input width {n} of {self.paths[keys[0]]}: A's rows "
                                 f"cannot be orthonormal; use rank <= {min(by_width)}")
            basis = _cached_basis(n, config.seed)
            columns, partial = choose_columns(n, config.rank, seed=config.seed, columns=config.columns,
                                              slot=config.slot)
            down = basis[:, columns].T.to(torch.float32)
            with torch.no_grad():
                for key in keys:
                    self.lora_A[key].weight.copy_(down)
            self.widths[n] = WidthBasis(basis_checksum(basis), n // config.rank, partial)

    @classmethod
    def config_for_run(cls, config: OrthoLoRAConfig, *, owner: str, library: Path) -> OrthoLoRAConfig:
        """Claim the run's slot (the same one again when the same owner resumes) when the config leaves it blank."""
        if config.columns != "slot" or config.slot is not None:
            return config
        return dataclasses.replace(config, slot=SlotRegistry(library).claim(config.seed, owner))

    # -- training -------------------------------------------------------------------------
    def frozen_parameters(self) -> list[nn.Parameter]:
        return [down.weight for down in self.lora_A.values()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        # peft's set_adapter would mark A trainable; exclude it here whatever its flag says.
        frozen = {id(p) for p in self.frozen_parameters()}
        return [p for p in super().trainable_parameters() if id(p) not in frozen]

    # -- header ---------------------------------------------------------------------------
    def header_metadata(self) -> dict[str, str]:
        config = self.config
        ortho = {"seed": config.seed, "columns": config.columns, "slot": config.slot, "rank": config.rank,
                 "widths": {str(n): dataclasses.asdict(basis) for n, basis in sorted(self.widths.items())}}
        # On top of LoRA's `lora_adapter_metadata`: diffusers still reads the file as a plain LoRA.
        return {**super().header_metadata(), "studio.ortho": json.dumps(ortho, sort_keys=True)}

    def read_header(self, header: dict[str, str]) -> None:
        raw = header.get("studio.ortho")
        if raw is None:
            raise ValueError("this ortho_lora file has no 'studio.ortho' header entry (it was not written by "
                             "save_adapter); load it as a plain LoRA with pipe.load_lora_weights")
        self.widths = {int(n): WidthBasis(**basis) for n, basis in json.loads(raw)["widths"].items()}


class SlotRegistry:
    """Which basis slot each concept holds, per basis seed: one file per claim,
    `<library>/.ortho-slots/seed-<seed>/slot-<k>.json`, so that every process and machine sharing the library
    folder agrees. A claim is written to a temporary file and hard-linked to its slot's name: the link fails when
    the slot is taken, and a slot file appears whole or not at all."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser() / SLOTS_DIR

    def folder(self, seed: int) -> Path:
        return self.root / f"seed-{seed}"

    def claims(self, seed: int) -> dict[int, str]:
        """Slot -> owner of every claim on this seed's basis, by slot."""
        folder = self.folder(seed)
        found = {}
        for path in folder.glob("slot-*.json") if folder.is_dir() else []:
            index = path.stem.removeprefix("slot-")
            if index.isdigit():
                found[int(index)] = _owner_of(path)
        return dict(sorted(found.items()))

    def claim(self, seed: int, owner: str) -> int:
        """The slot `owner` holds on this seed's basis, claiming the lowest free one if it holds none."""
        held = [slot for slot, who in self.claims(seed).items() if who == owner]
        if held:
            return held[0]
        folder = self.folder(seed)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".claim-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"owner": owner, "claimed": datetime.now(timezone.utc).isoformat(timespec="seconds")}, f)
                f.flush()
                os.fsync(f.fileno())  # whole on disk before it gets its slot's name (shared and network folders)
            slot = 0
            while True:
                target = folder / f"slot-{slot}.json"
                try:
                    os.link(tmp, target)
                    return slot
                except FileExistsError:
                    if _owner_of(target) == owner:  # another process of the same run got there first
                        return slot
                except OSError as e:
                    raise OSError(f"cannot claim an orthogonal-LoRA slot in {folder}: its file system refuses hard "
                                  f"links ({e}); set the slot by hand (method option slot=K)") from e
                slot += 1
        finally:
            os.unlink(tmp)


def _owner_of(path: Path) -> str:
    return json.loads(path.read_text(encoding="utf-8"))["owner"]


@dataclass(frozen=True)
class OrthogonalityReport:
    """How far apart LoRAs' down-projections are: per input width, the largest |cos| between a row of one
    adapter's A and a row of another's on the same layer (0: mutually orthogonal; 1: a shared column)."""

    overlap: dict[int, float]
    tolerance: float

    @property
    def shared(self) -> list[int]:
        """The input widths where some pair of adapters is not orthogonal."""
        return [n for n, value in sorted(self.overlap.items()) if value > self.tolerance]

    @property
    def orthogonal(self) -> bool:
        return not self.shared


def check_orthogonal(adapters: Sequence[LoRA], tolerance: float = 1e-4) -> OrthogonalityReport:
    """Whether the adapters' A row spaces are mutually orthogonal, layer by layer (where two adapt the same one):
    only then is their sum free of crosstalk. Each A is normalised once, then compared with the others'."""
    rows_per_layer: dict[str, list[torch.Tensor]] = {}
    overlap: dict[int, float] = {}
    with torch.no_grad():
        for adapter in adapters:
            for key, path in adapter.paths.items():
                rows = F.normalize(adapter.lora_A[key].weight.flatten(1).float(), dim=1)
                rows_per_layer.setdefault(path, []).append(rows)
        for rows in rows_per_layer.values():
            for a, b in itertools.combinations(rows, 2):
                width = a.shape[1]
                overlap[width] = max(overlap.get(width, 0.0), (a @ b.to(a.device).T).abs().max().item())
    return OrthogonalityReport(dict(sorted(overlap.items())), tolerance)

