"""What one encoded prompt holds on SD 1.5's and SDXL's full-size text encoders (random weights): encoded with
grad, as `encode_call` did before session 25 (diffusers' `encode_prompt` outside the pipeline's no-grad `__call__`),
and without, as it does now. The embeddings live for the whole call (a composer holds one set per region prompt), so
with grad every text encoder's activations stayed alive with them.

    python bench/text_encoding_memory.py [--dtype float16]

Counted by bench/tensor_memory.py (the tensors alive after encoding one prompt and its negative, batch 1, 77
tokens; the weights are not counted).
"""

from __future__ import annotations

import argparse
import platform
from contextlib import nullcontext

import torch
from tensor_memory import TensorPeak
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipelines import EMBEDDED_MODEL
from pipelines.architectures import tiny_sd15_pipeline, tiny_sdxl_pipeline

# Full-size towers (the configs of SD 1.5's CLIP ViT-L/14 and SDXL's OpenCLIP ViT-bigG/14 text encoders).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu")
BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             hidden_act="gelu", projection_dim=1280)


def full_size(family: str, dtype: torch.dtype):
    """A tiny pipeline of `family` whose text encoders are the real ones' size (the UNet is not run)."""
    make = tiny_sd15_pipeline if family == "SD 1.5" else tiny_sdxl_pipeline
    pipe = make(str(EMBEDDED_MODEL / "tokenizer"))
    tokenizer = pipe.tokenizer
    tokenizer.model_max_length = 77
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, **common)).to(dtype)
    if family == "SDXL":
        pipe.tokenizer_2 = tokenizer
        pipe.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G, **common)).to(dtype)
    return pipe


def held_after_encoding(pipe, grad: bool) -> int:
    """Bytes of the tensors still alive once one prompt and its negative are encoded, the outputs kept."""
    with TensorPeak() as memory, (nullcontext() if grad else torch.no_grad()):
        kept = pipe.encode_prompt(prompt="a photo of a dog", device=torch.device("cpu"), num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt="blurry")
    held = memory.live
    del kept
    return held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.dtype}")
    for family in ("SD 1.5", "SDXL"):
        pipe = full_size(family, dtype)
        with_grad, without = held_after_encoding(pipe, grad=True), held_after_encoding(pipe, grad=False)
        print(f"{family:6s} one prompt + negative held: with grad {with_grad / 2**20:8.1f} MiB, without "
              f"{without / 2**20:6.2f} MiB ({with_grad / without:.0f}x)", flush=True)


if __name__ == "__main__":
    main()
