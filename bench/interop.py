"""LoRA interop (issue #21): this studio's loader against diffusers' own, on kohya files from both sides.

    OMP_NUM_THREADS=1 python bench/interop.py [--rank 4] [--seed 0]

Two kohya files, on a tiny random-weight pipeline with SD 1.5's layouts (pipelines/architectures.py), fp32, CPU:
1. written by diffusers' own converter: a peft LoRA (random A and B) on the UNet's attention and the text
   encoder's attention and MLP, its state dict through `convert_state_dict_to_kohya`;
2. exported here (`adapters.kohya.export_kohya`) from our LoRA (adapters/lora.py; attention and resnet convs,
   alpha != rank).
Each is loaded by `adapters.foreign` (matched / unmatched keys) and by diffusers' `pipe.load_lora_weights` on an
identical copy of the pipeline; printed: the max |difference| of the text encoder's output, of the UNet's output
(conditioned on that text, one timestep) and of a 2-step image. Targets: 0 unmatched keys and max |difference|
<= 1e-5, each with a one-line verdict.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from adapters import LoRA, LoRAConfig  # noqa: E402
from adapters.foreign import ForeignLoRA, link_pipeline, load_foreign_lora  # noqa: E402
from adapters.kohya import export_kohya  # noqa: E402
from pipelines import EMBEDDED_MODEL  # noqa: E402
from pipelines.architectures import tiny_sd15_pipeline  # noqa: E402

TOLERANCE = 1e-5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPT = "a red star on a blue square"


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The same random-weight tiny SD 1.5-layout pipeline for every `seed` (both loaders get identical copies)."""
    pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"), seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_kohya_file(path: Path, rank: int, seed: int = 0) -> Path:
    """A kohya LoRA written by diffusers' converter: random peft LoRAs on a tiny pipeline's UNet and text encoder
    (alpha = rank, which is what `convert_state_dict_to_kohya` writes as `.alpha`)."""
    pipe = tiny_pipeline(seed)
    torch.manual_seed(seed + 1)
    # init_lora_weights=False: peft draws B at random too, so the LoRA changes the outputs.
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS, init_lora_weights=False))
    # peft directly: transformers' `add_adapter` wants a newer peft than this environment's 0.21.
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS, init_lora_weights=False),
                            pipe.text_encoder)
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    state.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder).items()})
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}, str(path))
    return path


def studio_kohya_file(path: Path, rank: int, seed: int = 0) -> tuple[Path, LoRA]:
    """A kohya file exported here from our LoRA (attention and resnet convs, alpha = rank / 2, random B)."""
    pipe = tiny_pipeline(seed)
    lora = LoRA.from_unet(pipe.unet, LoRAConfig(rank=rank, alpha=rank / 2, target="attn_conv"))
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in lora.lora_B.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return export_kohya(lora, path, trigger_words=["sks"]), lora


@torch.no_grad()
def outputs(pipe: StableDiffusionPipeline, seed: int = 0) -> dict[str, torch.Tensor]:
    """The text encoder's output for PROMPT, the UNet's output on it, and a 2-step 64x64 image (seeded)."""
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    unet = pipe.unet(latents, torch.tensor(500), encoder_hidden_states=text).sample
    image = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                 output_type="np").images
    return {"text encoder": text, "UNet": unet, "image": torch.from_numpy(image)}


def compare(path: Path, seed: int = 0) -> tuple[ForeignLoRA, dict[str, float], dict[str, float]]:
    """Load `path` here and with diffusers on identical pipelines: our adapter, the max |ours - diffusers'| per
    output, and the max |ours - base| (the LoRA's own effect, so that a zero difference means something)."""
    ours_pipe, theirs_pipe = tiny_pipeline(seed), tiny_pipeline(seed)
    base = outputs(ours_pipe, seed)
    link_pipeline(ours_pipe)
    adapter = load_foreign_lora(path, ours_pipe.unet)
    theirs_pipe.load_lora_weights(str(path))
    ours, theirs = outputs(ours_pipe, seed), outputs(theirs_pipe, seed)
    return (adapter, {name: (ours[name] - theirs[name]).abs().max().item() for name in ours},
            {name: (ours[name] - base[name]).abs().max().item() for name in ours})


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # its "no LoRA keys for the text encoder" notice on UNet-only files
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU fp32; "
          f"tiny SD 1.5-layout pipeline (random weights), rank {args.rank}")
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "diffusers' convert_state_dict_to_kohya": diffusers_kohya_file(Path(tmp, "diffusers.safetensors"),
                                                                            args.rank, args.seed),
            "exported here (export_kohya)": studio_kohya_file(Path(tmp, "studio.safetensors"), args.rank,
                                                              args.seed)[0],
        }
        for label, path in files.items():
            adapter, diffs, effects = compare(path, args.seed)
            report = adapter.report
            parts = ", ".join(f"{c} {n}" for c, n in sorted(report.by_component().items()))
            worst = max(diffs.values())
            print(f"\n{label}: {len(report.matched)} modules matched ({parts}), {report.matched_keys} keys matched, "
                  f"{len(report.unmatched)} unmatched")
            print("  max |ours - diffusers|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
            print("  max |ours - base| (the LoRA's effect): " + ", ".join(f"{k} {v:.2e}" for k, v in effects.items()))
            print(f"  target 0 unmatched keys: {verdict(not report.unmatched)} ({len(report.unmatched)})")
            print(f"  target max |difference| <= {TOLERANCE:g}: {verdict(worst <= TOLERANCE)} ({worst:.2e})")


if __name__ == "__main__":
    main()
