"""The Shapes model's components: a generated CLIP BPE tokenizer and SD-architecture configs.

Same classes as Stable Diffusion (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
UNet2DConditionModel, DDIMScheduler), only narrower; nothing downstream special-cases it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES

MAX_LENGTH = 32  # two-object captions plus a trigger word fit with room to spare
WORLD_WORDS = sorted(
    set(COLORS) | set(SHAPES) | set(SIZES) | set(POSITIONS) | set(BACKGROUNDS)
    | {"a", "on", "the", "and", "background", "outline", "style", "of", "photo", "in", "with"}
)

TEXT_ENCODER_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=64,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
)


LATENT_RESOLUTIONS = (16, 8, 4)  # the UNet's levels, from the full 16x16 latents of a 64x64 image down
SHIPPED_CROSS_ATTENTION = (16, 8)  # SD 1.x's pattern: text at the higher resolutions, none at the lowest


def unet_config(cross_attention: tuple[int, ...] = SHIPPED_CROSS_ATTENTION) -> dict:
    """The UNet, with cross-attention at the latent resolutions in `cross_attention` (the mid block always has it).

    Heads: 8 per attention block as in SD 1.x, but 2 of width 32 at the full resolution, where 8-wide heads
    made attention a third of a CPU training step (docs/benchmarks.md, session 6)."""
    unknown = set(cross_attention) - set(LATENT_RESOLUTIONS)
    if unknown:
        raise ValueError(f"cross_attention {sorted(unknown)}: the levels are {LATENT_RESOLUTIONS}")
    down = tuple("CrossAttnDownBlock2D" if r in cross_attention else "DownBlock2D" for r in LATENT_RESOLUTIONS)
    up = tuple("CrossAttnUpBlock2D" if r in cross_attention else "UpBlock2D" for r in reversed(LATENT_RESOLUTIONS))
    heads = tuple(2 if r == LATENT_RESOLUTIONS[0] else 8 for r in LATENT_RESOLUTIONS)
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 96, 128),
        down_block_types=down, up_block_types=up, cross_attention_dim=64, attention_head_dim=heads,
        norm_num_groups=16,
    )


SCHEDULER_CONFIG = dict(  # Stable Diffusion's schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy lowest-rank-first BPE of one word, as CLIP's tokenizer does it."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def write_tokenizer(out_dir: str | Path, words: list[str] = WORLD_WORDS) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs for a CLIPTokenizer.

    The base vocabulary is CLIP's 256 byte symbols with and without `</w>`, so any text
    tokenizes (new trigger words fall back to characters); each world word gets merges that
    make it a single token. Merges are appended in the order that makes every word reach one
    token given the merges before it (appending lower-priority merges never changes an
    already-merged word)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
            parts = [pair[0] + pair[1]] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
