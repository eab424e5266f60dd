"""Real Stable Diffusion UNet layouts, full size and shrunk, built without downloading anything.

The full-size configs are SD 1.5's and SDXL's published `unet/config.json` values; built on the
`meta` device they cost no memory, so tuner parameter counts on the real layouts are exact.
The tiny variants (SD 1.5, SD 2.x, SDXL) keep every block type, layer count and skip connection and shrink only
the channel widths: the architecture tests of the adapters run on them in seconds.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
# Same layouts, channels shrunk (SDXL's pooled text width 32 + 6 size ids x 8 = 80).
TINY_SD15_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64),
                  "cross_attention_dim": 32, "norm_num_groups": 8}
# SD 2.x: SD 1.5's blocks with a 1024-wide context (OpenCLIP-H), linear transformer projections and heads per level.
TINY_SD2_UNET = {**TINY_SD15_UNET, "attention_head_dim": (2, 4, 8, 8), "cross_attention_dim": 1024,
                 "use_linear_projection": True, "upcast_attention": True}
TINY_SDXL_UNET = {**SDXL_UNET, "sample_size": 8, "block_out_channels": (32, 64, 64),
                  "attention_head_dim": (2, 4, 4), "cross_attention_dim": 64,
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80, "norm_num_groups": 8}
LAYOUTS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny-sd15": TINY_SD15_UNET, "tiny-sd2": TINY_SD2_UNET,
           "tiny-sdxl": TINY_SDXL_UNET}


def build_unet(layout: str, seed: int = 0, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """A UNet with one of the LAYOUTS; on device "meta" no memory is allocated (for counting)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**LAYOUTS[layout])


def unet_inputs(unet: UNet2DConditionModel, batch: int = 1, seed: int = 0) -> dict:
    """Seeded random inputs of the right shapes for any UNet (SDXL's added conditions too)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    size = cfg.sample_size
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 8, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32),
        }
    return inputs


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# SD 1.x/2.x's DDIM configuration (their scheduler_config.json).
SD_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)


def tiny_vae(seed: int = 0, **config):
    """SD's VAE layout (4 blocks, 8x downsampling, 4 latent channels) shrunk to run in seconds, for 64x64 images."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
        **config,
    )


def tiny_sd15_pipeline(tokenizer_dir: str, seed: int = 0):
    """A random-weight StableDiffusionPipeline with SD 1.5's layouts (UNet, VAE with 4 blocks and
    an 8x downsampling, CLIP text encoder) shrunk to run in seconds; 64x64 images, 8x8 latents.
    The tokenizer is loaded from a local folder (the embedded model's), never downloaded."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet = build_unet("tiny-sd15", seed=seed)
    vae = tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(**SD_DDIM)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sd2_pipeline(tokenizer_dir: str, seed: int = 0):
    """A random-weight StableDiffusionPipeline with SD 2.x's layouts, shrunk to run in seconds; 64x64 images.

    What makes it SD 2 (adapters.detect_family, the single-file loader and the checkpoint export all tell by it):
    the UNet's context is 1024 wide (OpenCLIP-H), its transformers project with Linear layers, the heads differ
    per level (TINY_SD2_UNET), and the scheduler predicts v (SD 2.1's 768-v config). The text encoder is a
    CLIPTextModel 1024 wide with GELU, as diffusers holds SD 2's OpenCLIP tower, but with 2 layers and a narrow
    MLP; the one local tokenizer pads with "!" as SD 2's does. Never downloads."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
    unet = build_unet("tiny-sd2", seed=seed)
    vae = tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=unet.config.cross_attention_dim, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=16, hidden_act="gelu",
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(**SD_DDIM, prediction_type="v_prediction")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sdxl_pipeline(tokenizer_dir: str, seed: int = 0, text_widths: tuple[int, int] | None = None):
    """A random-weight StableDiffusionXLPipeline with SDXL's layouts (TINY_SDXL_UNET: 2 transformer levels, 9 long
    skips, "text_time" added conditions), shrunk to run in seconds; 64x64 images, 8x8 latents.

    Both text encoders are there, as in SDXL: a CLIPTextModel and a CLIPTextModelWithProjection (32 wide each
    by default), whose penultimate hidden states concatenate to the UNet's cross_attention_dim (64) and whose
    projected pooled output (projection_dim 32) is the pooled-text part of the UNet's addition embedding
    (projection_class_embeddings_input_dim 80 = 32 + 6 size ids x addition_time_embed_dim 8). Both share the
    one local tokenizer (SDXL's two differ only in padding), never downloaded.

    text_widths: the two encoders' widths (summing to 64) when they must differ, as CLIP-L's and bigG's do (768,
    1280): diffusers' single-file loader tells the encoders apart by width, so an exported checkpoint of equal
    widths would not load back. text_encoder_2 keeps projection_dim 32 either way."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet = build_unet("tiny-sdxl", seed=seed)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    # text_encoder_2's width; text_encoder's is the rest of the cross-attention width
    width_1, width_2 = text_widths or (cfg.cross_attention_dim - pooled, pooled)
    if width_1 + width_2 != cfg.cross_attention_dim:
        raise ValueError(f"text_widths={text_widths} must sum to the UNet's context width {cfg.cross_attention_dim}")
    vae = tiny_vae(seed, scaling_factor=0.13025)  # SDXL's VAE scaling factor

    def clip_config(hidden: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **extra,
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config(width_1))
    torch.manual_seed(seed + 1)  # another seed: two identical encoders would hide a swapped pair
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(width_2, projection_dim=pooled))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
