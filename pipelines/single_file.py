"""Single-file Stable Diffusion checkpoints (`.safetensors`, or trusted `.ckpt`): inspect, then configure.

diffusers' `from_single_file` converts an original-format checkpoint into a pipeline, but it needs
the diffusers configs of every component (and a tokenizer) beside it, and by default fetches them
from the hub. Here they are written locally instead: the family is read from the checkpoint's
tensor shapes (the UNet's cross-attention width: 768 for SD 1.x, 1024 for SD 2.x), and the
configs are the published SD 1.5 / SD 2.1 ones. The CLIP BPE vocabulary, shared by both, ships
in assets/clip-tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .architectures import SD15_UNET
from .errors import ModelLoadError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
UNET_PREFIX = "model.diffusion_model."
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip-tokenizer"
CROSS_ATTENTION_FAMILIES = {768: "SD1", 1024: "SD2", 2048: "SDXL"}

# The published diffusers configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
_SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
CONFIGS = {
    "SD1": dict(
        unet=SD15_UNET,
        vae={**_SD_VAE, "sample_size": 512},
        text_encoder=dict(  # OpenAI CLIP ViT-L/14
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        ),
        scheduler={**_SD_SCHEDULER, "prediction_type": "epsilon"},
        pad_token="<|endoftext|>",
    ),
    "SD2": dict(
        # SD 2.1 (768 px, v-prediction), what diffusers itself assumes for SD 2.x checkpoints;
        # a 512 px epsilon "-base" checkpoint needs config= pointing at its own diffusers folder.
        unet={**SD15_UNET, "sample_size": 96, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
              "use_linear_projection": True, "upcast_attention": True},
        vae={**_SD_VAE, "sample_size": 768},
        text_encoder=dict(  # OpenCLIP ViT-H/14 text tower without its last layer (SD 2 uses the penultimate)
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
        ),
        scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
        pad_token="!",
    ),
}


def is_single_file(path: Path) -> bool:
    return path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES


def read_shapes(path: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, read without loading the weights (safetensors header or mmap)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} is a pickle checkpoint ({path.suffix}), which can run code when loaded: "
                "convert it to .safetensors, or pass allow_pickle=True (CLI/UI: only for files you trust)"
            )
        try:
            # The same restricted unpickler diffusers uses, so what loads here loads there.
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path} is not a readable torch checkpoint ({e}); is it complete?") from e
        while isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ModelLoadError(
            f"{path} is not a valid safetensors file ({e}): a renamed file or an incomplete download? "
            "Download it again or pass another model"
        ) from e


def checkpoint_family(path: Path, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """SD1 / SD2 / SDXL from the UNet's cross-attention width, or None for a width no SD family uses.

    Raises ModelLoadError when the file holds no full SD UNet (e.g. a LoRA or a lone VAE)."""
    to_k = [shape for name, shape in shapes.items()
            if name.startswith(UNET_PREFIX) and name.endswith("attn2.to_k.weight")]
    if not to_k:
        raise ModelLoadError(
            f"{path} holds no Stable Diffusion UNet (no '{UNET_PREFIX}*attn2' tensors): "
            "is it a LoRA/adapter or a VAE? Load a full checkpoint here and adapters separately"
        )
    return CROSS_ATTENTION_FAMILIES.get(to_k[0][1])


def write_config(family: str, out_dir: Path) -> None:
    """A diffusers folder without weights: what `from_single_file(config=...)` reads beside a checkpoint."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTokenizer

    cfg = CONFIGS[family]
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    for name, class_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        (out_dir / name).mkdir(exist_ok=True)
        (out_dir / name / "config.json").write_text(json.dumps({"_class_name": class_name, **cfg[name]}, indent=2))
    CLIPTextConfig(**cfg["text_encoder"], bos_token_id=49406, eos_token_id=49407).save_pretrained(
        out_dir / "text_encoder")
    DDIMScheduler(**cfg["scheduler"]).save_pretrained(out_dir / "scheduler")
    CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, pad_token=cfg["pad_token"]).save_pretrained(out_dir / "tokenizer")
