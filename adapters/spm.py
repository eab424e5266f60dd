"""SPM membranes (Lyu et al., "One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing
Applications", CVPR 2024, arXiv 2312.16145): a rank-1 LoRA (alpha 1) on every Linear and Conv2d inside the UNet's
Transformer2DModel blocks, trained to erase concepts (pipelines/erase.py), and applied with a strength computed
per prompt from its similarity to the erased concepts (facilitated transport, sec. "Facilitated Transport").

A membrane is a LoRA in everything but its targets, its file keys and `prepare`: peft carries the branch, and the
per-row strength goes through LoRA's `BranchInput` (`set_row_scales`); a generation call whose rows all get one
strength folds the membrane into the weights instead (`fold_for_call`: no branch to run, exact restore). Files use
kohya's naming (`lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`), so A1111 and
diffusers' `load_lora_weights` load a membrane as a plain static LoRA (no transport); the studio reads its config
(concepts, surrogate, eta, anchor weight, transport, facilitate factor) back from the `studio.config` header entry.

Facilitated transport, per UNet batch row with prompt p (`prepare`):

    gamma(p) = facilitate_factor * max over concepts c of max(cos(vec E(p), vec E(c)), |T(p) & T(c)| / |T(c)|)

E: the pipeline's text embeddings (the last hidden state, L x D, flattened); T: the set of token ids without BOS,
EOS and padding. An unconditional (negative) row takes the gamma of the conditional row classifier-free guidance
pairs it with. transport "additive": W x + gamma s U D x (linear in gamma; membranes never interact); "squared":
gamma^2 s U D x per membrane, the reference code's form for one membrane (it scales both factors by gamma; with
several membranes it sums the factors, (sum_i g_i U_i)(sum_j g_j D_j), whose cross terms U_i D_j are not
reproduced here: each membrane keeps its own gamma^2); "off": a static membrane at its scale.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .base import device_of, option, register
from .checks import is_int, is_number
from .context import CallContext, Row, TextEncoding
from .fusion import fold_for_call
from .kohya import decode_own_unet_name, kohya_name
from .lora import LoRA, layer_shape, pair_shapes

TRANSPORTS = ("additive", "squared", "off")
SIMILARITIES = ("full", "no_padding")
_KOHYA_DOWN = re.compile(r"lora_unet_(\w+)\.lora_down\.weight")


@dataclass
class SPMConfig:
    # Not shown in the Train tab (ui=False): membranes train from concept names in the Erase tab, not from images.
    concepts: list[str] = option([], "the concepts the membrane erases (words or short phrases)")
    surrogate: str = option("", "what the concepts turn into ('' erases towards the unconditional image)")
    eta: float = option(1.0, "eta: strength of the negative guidance away from the concept", minimum=0.0)
    # The paper's 1000 (SD 1.4): both losses are per-element mean squared errors of noise predictions, so the
    # balance does not depend on the resolution; the authors lower it on other bases when erasure is too weak.
    anchor_weight: float = option(1000.0, "lambda: weight of the latent-anchoring loss (0: none)", minimum=0.0)
    num_anchors: int = option(4, "K: random anchor embeddings per step (0: no anchoring)", minimum=0)
    facilitate_factor: float = option(1.0, "scales the per-prompt permeability gamma", minimum=0.0)
    transport: str = option("additive", "how gamma scales the membrane", choices=(
        ("additive: W x + gamma U D x", "additive"), ("squared: gamma^2 (the reference code)", "squared"),
        ("off: a static membrane", "off")))
    similarity: str = option("full", "the embedding similarity of gamma", choices=(
        ("flattened 77-token cosine (the paper)", "full"), ("without BOS/EOS/padding positions", "no_padding")))

    # A membrane is rank 1, alpha 1 (a branch scale of 1); LoRA's code reads these.
    rank: ClassVar[int] = 1
    alpha: ClassVar[float] = 1.0
    dropout: ClassVar[float] = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.concepts, str) or not isinstance(self.concepts, (list, tuple)) or not self.concepts:
            raise ValueError(f"SPMConfig.concepts must be a non-empty list of concept names, e.g. ['van gogh'], "
                             f"got {self.concepts!r}")
        self.concepts = list(self.concepts)
        for i, concept in enumerate(self.concepts):
            if not isinstance(concept, str) or not concept.strip():
                raise ValueError(f"SPMConfig.concepts[{i}]={concept!r} is empty; give a word or phrase to erase")
        if not isinstance(self.surrogate, str):
            raise ValueError(f"SPMConfig.surrogate must be a string ('' for none), got {self.surrogate!r}")
        for name in ("eta", "anchor_weight", "facilitate_factor"):
            if not is_number(getattr(self, name), 0):
                raise ValueError(f"SPMConfig.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not is_int(self.num_anchors, 0):
            raise ValueError(f"SPMConfig.num_anchors must be an integer >= 0, got {self.num_anchors!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"SPMConfig.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"SPMConfig.similarity must be one of {SIMILARITIES}, got {self.similarity!r}")


def check_texts(tokenizer: Any, texts: Sequence[str], what: str = "concept") -> None:
    """Refuse texts the text encoder cannot read whole: ones with no word the tokenizer knows (only unknown
    characters), or longer than its `model_max_length` (start and end tokens included), which it would truncate.
    Messages name the text and the fix; the empty string is allowed (a surrogate of "")."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    limit = tokenizer.model_max_length
    for text in texts:
        if not text:
            continue
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
        if not [i for i in ids if i not in special and i != tokenizer.unk_token_id]:
            raise ValueError(f"{what} {text!r}: the tokenizer reads no word in it (only characters it does not "
                             "know); spell it in words")
        if len(ids) + 2 > limit:  # + the start and end tokens
            raise ValueError(f"{what} {text!r} is {len(ids) + 2} tokens but the text encoder reads {limit} (start "
                             "and end included); shorten it")


def membrane_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Module path -> every Linear and Conv2d inside the UNet's Transformer2DModel blocks (selected by type, as
    diffusers' wrapper classes would hide them from a match on class names), seen through a peft wrapper another
    adapter left there (not its own lora_A/lora_B)."""
    found = {}
    for name, block in unet.named_modules():
        if not isinstance(block, Transformer2DModel):
            continue
        wrapped: tuple[str, ...] = ()
        for path, module in block.named_modules(prefix=name):
            if path.startswith(wrapped):
                continue
            if isinstance(module, BaseTunerLayer):
                found[path] = module.get_base_layer()
                wrapped += (f"{path}.",)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                found[path] = module
    for path, layer in found.items():
        if isinstance(shape := layer_shape(layer), str):
            raise ValueError(f"{path} is a {shape}; a membrane adapts Linear and 'same' Conv2d layers only")
    return found


@torch.no_grad()
def permeability(prompt_embeds: torch.Tensor, prompt_ids: torch.Tensor, concept_embeds: torch.Tensor,
                 concept_ids: torch.Tensor, special_ids: frozenset[int], similarity: str = "full") -> torch.Tensor:
    """gamma (B,) in fp32: per prompt, the max over the concepts of max(cosine of the flattened embeddings, share of
    the concept's tokens in the prompt). Embeddings (B, L, D) and (K, L, D), token ids (B, L) and (K, L);
    "no_padding" leaves BOS, EOS and padding positions out of the cosine (the shared positions that make any two
    prompts look alike)."""
    if prompt_embeds.shape[1:] != concept_embeds.shape[1:]:
        raise ValueError(f"prompt embeddings {tuple(prompt_embeds.shape[1:])} and concept embeddings "
                         f"{tuple(concept_embeds.shape[1:])} differ in shape: encode both with the same text encoder")
    special = torch.tensor(sorted(special_ids))
    words_p, words_c = ~torch.isin(prompt_ids.cpu(), special), ~torch.isin(concept_ids.cpu(), special)
    p, c = prompt_embeds.float(), concept_embeds.float().to(prompt_embeds.device)
    if similarity == "no_padding":
        p = p * words_p[..., None].to(p.device)
        c = c * words_c[..., None].to(c.device)
    cosine = F.cosine_similarity(p.flatten(1)[:, None], c.flatten(1)[None], dim=-1).cpu()  # (B, K)
    prompt_sets = [set(ids[mask].tolist()) for ids, mask in zip(prompt_ids.cpu(), words_p)]
    concept_sets = [set(ids[mask].tolist()) for ids, mask in zip(concept_ids.cpu(), words_c)]
    overlap = torch.tensor([[len(ps & cs) / max(len(cs), 1) for cs in concept_sets] for ps in prompt_sets])
    # The cosine of a prompt with itself may round above 1.
    return torch.maximum(cosine.clamp(max=1.0), overlap).amax(dim=1)


def gamma_sources(rows: Sequence[Row]) -> list[int]:
    """Per row, the row whose prompt sets its gamma: its own, but an unconditional row takes the conditional row
    classifier-free guidance pairs it with (pipelines stack [..., uncond rows, their guided rows] in order)."""
    uncond = [i for i, row in enumerate(rows) if row.branch == "uncond"]
    guided = [i for i, row in enumerate(rows) if row.branch != "uncond"]
    sources = list(range(len(rows)))
    if uncond and len(guided) >= len(uncond):
        for u, g in zip(uncond, guided[-len(uncond):]):
            sources[u] = g
    return sources


@register
class SPM(LoRA):
    """A membrane: build with `from_unet(unet, SPMConfig(concepts=[...]))` or load its file (adapters/io.py)."""

    method = "spm"
    config_class = SPMConfig
    label = "SPM membrane"
    summary = ("Erases concepts with a rank-1 membrane whose strength follows each prompt's similarity to them "
               "(facilitated transport); trained from the concept names alone, no images.")
    objective = "erase"
    recommended_for = {}  # LoRA's measured settings are for customization, not erasure

    def __init__(self, config: SPMConfig, shapes: dict[str, tuple[int, ...]]):
        super().__init__(config, shapes)
        self.last_gammas: dict[str, float] = {}  # prompt -> gamma of the last call prepared with transport
        # Fold into the weights for a call whose rows share one strength (fold_for_call): generation costs what it
        # costs without the membrane, for a second copy of the adapted weights while the call runs (SD 1.5: 267 M
        # parameters, 0.5 GiB in fp16; SDXL: 4.1 GiB). False keeps the per-row branches instead.
        self.fold = True
        self._folded_at: float | None = None  # the factor on `scale` while folded
        # peft's layers are built at the first UNet call that needs the branches (see _attach).
        self._branches = False
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @classmethod
    def targets(cls, unet: nn.Module, config: SPMConfig) -> dict[str, nn.Module]:
        layers = membrane_layers(unet)
        if not layers:
            raise ValueError("this UNet has no Transformer2DModel blocks: a membrane has nothing to attach to")
        return layers

    @classmethod
    def from_shapes(cls, config: SPMConfig, shapes: dict[str, tuple[int, ...]]) -> SPM:
        # A membrane file is ours, written from a diffusers UNet's Transformer2DModel blocks, and from_shapes has
        # no UNet to encode names against: its kohya names are read back with the words we know we wrote.
        return cls(config, pair_shapes(shapes, _KOHYA_DOWN, lambda name: f"lora_unet_{name}.lora_up.weight",
                                       decode_own_unet_name))

    # -- serialisation: kohya keys ----------------------------------------------------------
    def _file_keys(self) -> dict[str, str]:
        return {
            f"{kohya_name('unet', path)}.{kohya}.weight": f"{part}.{key}.weight"
            for key, path in self.paths.items()
            for kohya, part in (("lora_down", "lora_A"), ("lora_up", "lora_B"))
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        alphas = {f"{kohya_name('unet', path)}.alpha": torch.tensor(float(self.config.alpha))
                  for path in self.paths.values()}
        return {**super().tensors(), **alphas}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        alphas = {name: t for name, t in tensors.items() if name.endswith(".alpha")}
        for name, alpha in alphas.items():
            if alpha.numel() != 1 or float(alpha) != self.config.alpha:
                raise ValueError(f"{name} is {alpha.tolist()}, but a membrane has alpha {self.config.alpha:g}")
        super().load_tensors({name: t for name, t in tensors.items() if name not in alphas})

    def header_metadata(self) -> dict[str, str]:
        # kohya's own entries (A1111 shows them); no diffusers `lora_adapter_metadata`: the .alpha keys say it all.
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(self.config.rank),
                "ss_network_alpha": f"{self.config.alpha:g}"}

    # -- facilitated transport ----------------------------------------------------------------
    def prepare(self, context: CallContext | None) -> None:
        """Set each row's strength from its prompt (see the module's docstring). Static (every row at `scale`)
        with transport "off", outside a call, and in a call whose pipeline gives no text encoding (the training
        loop's: the erasing objective drives the membrane itself). In a generation call whose rows all get one
        strength (one prompt, or transport "off"), the membrane is folded into the weights for the call."""
        self._unfold()
        self.set_row_scales(None)
        if context is None:  # the call ended: its gammas stay readable (infotext_params)
            return
        self.last_gammas = {}
        if context.text_encoding is None:
            return
        factors = None if self.config.transport == "off" else self._transport_factors(context)
        uniform = factors is None or bool((factors == factors[0]).all())
        training = any(row.branch == "train" for row in context.rows)
        # Folded weights act on every row: not when the call keeps adapters off its unconditional rows.
        if uniform and context.adapters_on_uncond and self.fold and self.unet is not None and not self.merged \
                and not training:
            self._folded_at = 1.0 if factors is None else float(factors[0])
            fold_for_call(self.unet, self, self.delta_weights(self.scale * self._folded_at))
            self._bypass(True)
        else:
            self.set_row_scales(factors)

    def _transport_factors(self, context: CallContext) -> torch.Tensor:
        """Each row's factor on the membrane's scale, gamma or gamma^2 (the transport), from its prompt; the gammas
        by prompt are kept in `last_gammas`."""
        sources = gamma_sources(context.rows)
        prompts = [context.rows[i].prompt for i in sources]
        encoding = context.text_encoding
        if context.text_embeds is not None and context.token_ids is not None:
            embeds, ids = context.text_embeds[sources], context.token_ids[sources]
        else:  # a pipeline that gives only the prompts: encode them as the concepts are
            distinct = list(dict.fromkeys(prompts))
            with torch.no_grad():
                encoded, encoded_ids = encoding.encode(distinct)
            index = torch.tensor([distinct.index(p) for p in prompts])
            embeds, ids = encoded[index.to(encoded.device)], encoded_ids[index]
        gammas = self.gammas(embeds, ids, encoding)
        self.last_gammas = {prompt: float(g) for prompt, g in zip(prompts, gammas)}
        return gammas.square() if self.config.transport == "squared" else gammas

    def _unfold(self) -> None:
        if self._folded_at is not None:
            fold_for_call(self.unet, self, None)
            self._bypass(False)
            self._folded_at = None

    def set_scale(self, scale: float) -> None:
        super().set_scale(scale)
        if self._folded_at is not None:  # fold again at the new scale
            fold_for_call(self.unet, self, self.delta_weights(self.scale * self._folded_at))

    # -- wiring: peft's layers only once a branch is needed ------------------------------------
    def _attach(self, unet: nn.Module) -> None:
        # A generation call with one prompt folds the membrane and never runs its branches, and building peft's
        # layers costs about as much as such a call on a small model; so they are built by a hook at the first UNet
        # call that is not folded (training, a batch of different strengths, a call outside any pipeline).
        self._check_fits(unet)
        self.to(device_of(unet))
        self._hook = unet.register_forward_pre_hook(self._before_unet_call)

    def _before_unet_call(self, unet: nn.Module, args: tuple) -> None:
        if not self._branches and self._folded_at is None and not self.merged:
            super()._attach(unet)
            self._branches = True

    def _layers(self, action: str) -> list[BaseTunerLayer]:
        self._check_attached(action)
        return super()._layers(action) if self._branches else []

    def _detach(self) -> None:
        self._unfold()  # while the peft layers it bypasses are still there
        self._hook.remove()
        if self._branches:
            super()._detach()
            self._branches = False
        elif self.merged:
            self.unmerge()

    def merge(self) -> None:
        self._unfold()  # a merge writes into the weights' own tensors, which a fold sets aside
        super().merge()

    def gammas(self, embeds: torch.Tensor, ids: torch.Tensor, encoding: TextEncoding) -> torch.Tensor:
        """gamma (B,) of prompts with these embeddings (B, L, D) and token ids (B, L), whatever the transport:
        facilitate_factor x their permeability to the concepts, encoded by `encoding`."""
        with torch.no_grad():
            concept_embeds, concept_ids = encoding.encode(self.config.concepts)
        return self.config.facilitate_factor * permeability(embeds, ids, concept_embeds, concept_ids,
                                                            encoding.special_ids, self.config.similarity)

    def infotext_params(self) -> dict[str, str]:
        if not self.last_gammas:
            return {}
        concepts = " + ".join(self.config.concepts)
        return {"SPM gamma": ", ".join(f"{concepts}: {g:.3f}" for g in self.last_gammas.values())}
