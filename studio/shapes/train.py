"""Train the embedded Shapes model: the VAE first, then the UNet (text encoder frozen by default).

    studio shapes train --out runs/shapes        # seeded; re-run the same command to resume

The UNet learns the named world (base shapes, filled) from captions and, in its caption-dropout share,
the whole world unnamed (held-out shapes and the outline style too), as a real checkpoint's unconditional
branch has seen what its captions never named (docs/benchmarks.md, base model).

`--unet-init MODEL` warm-starts the UNet (and takes the text encoder) from a trained model of the same
widths, possibly with another `--cross-attention` layout: weights that fit are copied, attention blocks
the layout lacks are dropped, added ones start as no-ops (how the shipped model was made: its card says).

Each stage checkpoints its full state (weights, optimizer, EMA, RNG, step) every
`--ckpt-every` steps to DIR/<stage>_state.safetensors (written atomically, no pickle) and resumes from it.
Progress goes to DIR/train.log. The finished diffusers folder is DIR/model.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import string
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipelines.statefile import load_state, refuse_pickle, save_state

from .model import (
    LATENT_RESOLUTIONS,
    SCHEDULER_CONFIG,
    SHIPPED_CROSS_ATTENTION,
    TEXT_ENCODER_CONFIG,
    VAE_CONFIG,
    WORLD_WORDS,
    unet_config,
    write_tokenizer,
)
from .world import BASE_SHAPES, SHAPES, render, sample_scene


def render_pool(n: int, seed: int, shapes: tuple[str, ...], outline_prob: float) -> tuple[torch.Tensor, list[str]]:
    """n seeded scenes as a uint8 tensor (n, 3, 64, 64) and their captions."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, shapes, outline_prob=outline_prob) for _ in range(n)]
    pixels = np.stack([np.asarray(render(s)) for s in scenes]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(pixels)), [s.caption() for s in scenes]


def unknown_word(rng: random.Random) -> str:
    """A word no world caption uses, as web alt-text is full of names and file names that show nothing."""
    while True:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
        if word not in WORLD_WORDS:
            return word


def with_unknown_words(captions: list[str], share: float, rng: random.Random) -> list[str]:
    """A `share` of the captions get an unknown word: half of them inside the caption, half as the whole
    caption ("a <word>"). The image stays the one the caption describes, so the UNet learns that a word it
    does not know names nothing, as a real checkpoint has learnt for a rare token such as "sks"."""
    out = []
    for caption in captions:
        if rng.random() < share:
            word = unknown_word(rng)
            if rng.random() < 0.5:
                caption = f"a {word}"
            else:
                words = caption.split()
                words.insert(rng.randint(1, len(words)), word)
                caption = " ".join(words)
        out.append(caption)
    return out


def to_unit(pixels_u8: torch.Tensor) -> torch.Tensor:
    return pixels_u8.float() / 127.5 - 1.0


def get_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


STAGES = ("vae", "vae_ft", "unet")  # each stage's state file: DIR/<stage>_state.safetensors


def refuse_pickled_states(out: Path) -> None:
    """Refuse, unopened, a run folder whose stage states are pickles (<stage>_state.pt, the format before
    safetensors): loading a pickle can run code hidden in it."""
    for stage in STAGES:
        old = out / f"{stage}_state.pt"
        if old.is_file() and not old.with_suffix(".safetensors").is_file():
            refuse_pickle(old, f"train into another --out, or delete {old.name} to train the {stage} stage "
                               "from its start")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_vae(state_path: Path, vae: AutoencoderKL, opt: torch.optim.Optimizer, log: Log, stage: str,
               fresh_seed: int) -> int:
    """Restore a VAE stage's full state (weights, optimizer, RNG) and return its step; seed a fresh start."""
    if not state_path.exists():
        torch.manual_seed(fresh_seed)
        return 0
    state = load_state(state_path)
    vae.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    log(f"{stage}: resumed at step {state['step']}")
    return state["step"]


def train_vae(out: Path, args: argparse.Namespace, device: torch.device, log: Log) -> AutoencoderKL:
    """The VAE sees every shape and the outline style (held-out concepts included, as SD's VAE
    saw everything): a VAE that never saw a star decodes it as a blob."""
    if (out / "vae" / "config.json").exists():
        return AutoencoderKL.from_pretrained(out / "vae").to(device)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    state_path = out / "vae_state.safetensors"
    step = resume_vae(state_path, vae, opt, log, "vae", fresh_seed=args.seed + 1)
    pool, _ = render_pool(args.vae_pool, args.seed + 100, SHAPES, outline_prob=0.2)
    t0 = time.time()
    while step < args.vae_steps:
        for group in opt.param_groups:
            group["lr"] = get_lr(step, args.vae_steps, args.vae_lr)
        x = to_unit(pool[torch.randint(0, len(pool), (args.vae_batch,))]).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps flat colours exact, MSE the edges; a tiny KL keeps the latent well scaled.
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.vae_kl * posterior.kl().mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"vae: loss is {loss.item()} at step {step}; lower --vae-lr and resume")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            mse = F.mse_loss(recon.detach().clamp(-1, 1), x).item() / 4  # in [0, 1] units
            log(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f} "
                f"psnr {10 * math.log10(1 / max(mse, 1e-10)):.2f} ({(time.time() - t0) / 50:.2f}s/step)")
            t0 = time.time()
        if step % args.ckpt_every == 0 or step == args.vae_steps:
            save_state({"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": rng_state()},
                       state_path)
    # The latent scaling factor is measured on data, as SD's 0.18215 was.
    with torch.no_grad():
        sample = to_unit(pool[:1024]).to(device)
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in sample.split(128)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(out / "vae")
    log(f"vae: done, scaling_factor {vae.config.scaling_factor:.4f}")
    return vae


def finetune_decoder(out: Path, args: argparse.Namespace, vae: AutoencoderKL, device: torch.device,
                     log: Log) -> AutoencoderKL:
    """Fine-tune the VAE decoder alone on deterministic (mean) latents, as SD's ft-MSE VAE did.

    The encoder, and so the latent space the UNet learned, stays fixed: this stage only sharpens
    decoding (colour and edge PSNR) and can run after the UNet has trained."""
    if args.decoder_steps <= 0 or (out / "vae_ft" / "config.json").exists():
        return AutoencoderKL.from_pretrained(out / "vae_ft").to(device) if args.decoder_steps > 0 else vae
    vae = copy.deepcopy(vae).requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    state_path = out / "vae_ft_state.safetensors"
    step = resume_vae(state_path, vae, opt, log, "decoder", fresh_seed=args.seed + 3)
    pool, _ = render_pool(args.vae_pool, args.seed + 300, SHAPES, outline_prob=0.2)
    t0 = time.time()
    while step < args.decoder_steps:
        for group in opt.param_groups:
            group["lr"] = get_lr(step, args.decoder_steps, args.decoder_lr, warmup=20)
        x = to_unit(pool[torch.randint(0, len(pool), (args.vae_batch,))]).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            mse = F.mse_loss(recon.detach().clamp(-1, 1), x).item() / 4
            log(f"decoder step {step}/{args.decoder_steps} loss {loss.item():.4f} "
                f"psnr {10 * math.log10(1 / max(mse, 1e-10)):.2f} ({(time.time() - t0) / 50:.2f}s/step)")
            t0 = time.time()
        if step % args.ckpt_every == 0 or step == args.decoder_steps:
            save_state({"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": rng_state()},
                       state_path)
    vae.save_pretrained(out / "vae_ft")
    log("decoder: done")
    return vae


def warm_start_unet(unet: UNet2DConditionModel, trained: UNet2DConditionModel, log: Log) -> None:
    """Start `unet` from a trained UNet of the same widths, whatever either's cross-attention layout.

    Shared weights are copied and attention blocks `unet` lacks are dropped. Each added attention block
    keeps its fresh init except for a zeroed output projection (as in the original LDM code), so it starts
    as a no-op and learns only what helps; with no block dropped, `unet` computes exactly what `trained` did."""
    own, theirs = unet.state_dict(), trained.state_dict()
    clash = [k for k, v in theirs.items() if k in own and own[k].shape != v.shape]
    if clash:
        raise ValueError(f"--unet-init: {len(clash)} trained weights do not fit this UNet (e.g. {clash[0]}); "
                         "warm-start only from a UNet of the same block widths")
    unet.load_state_dict({**own, **{k: v for k, v in theirs.items() if k in own}})
    blocks = {name for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)}
    trained_blocks = {name for name, m in trained.named_modules() if isinstance(m, Transformer2DModel)}
    added, dropped = sorted(blocks - trained_blocks), sorted(trained_blocks - blocks)
    with torch.no_grad():
        for name in added:
            proj_out = unet.get_submodule(f"{name}.proj_out")
            proj_out.weight.zero_()
            proj_out.bias.zero_()
    log(f"unet: warm-started from a trained UNet; attention blocks added: {', '.join(added) or 'none'}; "
        f"dropped: {', '.join(dropped) or 'none'}")


def encode_pool(vae: AutoencoderKL, pixels_u8: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every render, cached once; training samples from it per step."""
    with torch.no_grad():
        stats = [vae.encode(to_unit(chunk).to(device)).latent_dist for chunk in pixels_u8.split(256)]
    return torch.cat([d.mean for d in stats]), torch.cat([d.std for d in stats])


def train_unet(out: Path, args: argparse.Namespace, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
               device: torch.device, log: Log) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Captions only ever name base shapes, filled: held-out shapes and the outline style are left for
    customization. With --unconditional-world all (the default), the caption-dropout rows are drawn from
    the whole world, so the unconditional branch can draw what no caption names. The text encoder stays
    frozen at its seeded random initialisation unless --text-encoder trained: trained jointly, it collapsed
    the position words onto each other (position accuracy 39.7 % against 100 % colour and shape; see the
    model card)."""
    torch.manual_seed(args.seed + 2)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **TEXT_ENCODER_CONFIG)
    text_encoder = CLIPTextModel(text_config).to(device)
    unet = UNet2DConditionModel(**unet_config(tuple(args.cross_attention))).to(device)
    state_path = out / "unet_state.safetensors"
    if args.unet_init is not None and not state_path.exists():  # a resumed run has its weights in its state
        text_encoder = CLIPTextModel.from_pretrained(args.unet_init / "text_encoder").to(device)
        warm_start_unet(unet, UNet2DConditionModel.from_pretrained(args.unet_init / "unet"), log)
    train_text_encoder = args.text_encoder == "trained"
    text_encoder.requires_grad_(train_text_encoder)
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False),
           "text_encoder": copy.deepcopy(text_encoder).requires_grad_(False)}
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    step = 0
    if state_path.exists():
        state = load_state(state_path)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema["unet"].load_state_dict(state["ema_unet"])
        ema["text_encoder"].load_state_dict(state["ema_text_encoder"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        set_rng_state(state["rng"])
        log(f"unet: resumed at step {step}")
    if step >= args.unet_steps:  # finished earlier: nothing to cache or train
        return ema["unet"], ema["text_encoder"]

    # Cache the VAE posterior of every pooled render once (mean and std), sample per step.
    pool, captions = render_pool(args.unet_pool, args.seed + 200, BASE_SHAPES, outline_prob=0.0)
    lat_mean, lat_std = encode_pool(vae, pool, device)
    unnamed = None
    if args.unconditional_world == "all":  # a uniform draw over every shape and both styles, never captioned
        unnamed = encode_pool(vae, render_pool(args.unet_pool // 3, args.seed + 400, SHAPES, outline_prob=0.5)[0],
                              device)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(device)
    alphas = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)

    t0 = time.time()
    while step < args.unet_steps:
        for group in opt.param_groups:
            group["lr"] = get_lr(step, args.unet_steps, args.unet_lr, warmup=200)
        idx = torch.randint(0, len(pool), (args.unet_batch,))
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])) * vae.config.scaling_factor
        batch_ids = ids[idx]
        if args.unknown_words > 0:  # seeded by step, so a resumed run draws the same words
            texts = with_unknown_words([captions[i] for i in idx.tolist()], args.unknown_words,
                                       random.Random(args.seed * 1_000_003 + step))
            batch_ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(device)
        drop = torch.rand(len(idx), device=device) < args.caption_dropout  # trains the unconditional branch for CFG
        batch_ids = torch.where(drop[:, None], empty_ids, batch_ids)
        if unnamed is not None:
            u_mean, u_std = unnamed
            u_idx = torch.randint(0, len(u_mean), (len(idx),))
            u_latents = (u_mean[u_idx] + u_std[u_idx] * torch.randn_like(u_mean[u_idx])) * vae.config.scaling_factor
            latents = torch.where(drop[:, None, None, None], u_latents, latents)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with torch.set_grad_enabled(train_text_encoder):
            hidden = text_encoder(batch_ids).last_hidden_state
        pred = unet(noisy, t, hidden).sample
        # Min-SNR-5 weighting (Hang et al. 2023): faster convergence at equal steps.
        weight = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"unet: loss is {loss.item()} at step {step}; lower --unet-lr and resume")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, model in (("unet", unet), ("text_encoder", text_encoder)):
                for p_ema, p in zip(ema[name].parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        if step % 50 == 0:
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} ({(time.time() - t0) / 50:.2f}s/step)")
            t0 = time.time()
        if step % args.ckpt_every == 0 or step == args.unet_steps:
            save_state({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                        "ema_unet": ema["unet"].state_dict(), "ema_text_encoder": ema["text_encoder"].state_dict(),
                        "optimizer": opt.state_dict(), "step": step, "rng": rng_state()}, state_path)
    return ema["unet"], ema["text_encoder"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="studio shapes train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="run folder (re-run to resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-6)
    p.add_argument("--vae-pool", type=int, default=12000)
    p.add_argument("--decoder-steps", type=int, default=1200, help="decoder-only VAE fine-tune after the UNet")
    p.add_argument("--decoder-lr", type=float, default=3e-4)
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--unet-pool", type=int, default=30000)
    p.add_argument("--cross-attention", type=int, nargs="+", choices=LATENT_RESOLUTIONS,
                   default=list(SHIPPED_CROSS_ATTENTION),
                   help="latent resolutions whose UNet blocks have cross-attention (default: SD 1.x's pattern, "
                        "all but the lowest; the first shipped model had 8 4)")
    p.add_argument("--unet-init", type=Path, default=None,
                   help="model folder to warm-start the UNet from (text encoder too): same widths, any layout")
    p.add_argument("--unconditional-world", choices=("all", "base"), default="all",
                   help="what the caption-dropout rows show: every shape and style, unnamed (a real checkpoint's "
                        "unconditional branch has seen everything), or only the named base world")
    p.add_argument("--text-encoder", choices=("frozen", "trained"), default="frozen",
                   help="keep the text encoder at its seeded random init, or train it with the UNet")
    p.add_argument("--caption-dropout", type=float, default=0.2, help="share of each batch with the empty caption")
    p.add_argument("--unknown-words", type=float, default=0.0,
                   help="share of captioned rows with a word no caption uses (half inside the caption, half as "
                        "the whole caption), the image unchanged, so that unknown words name nothing (0 for the "
                        "shipped model; the candidate in docs/benchmarks.md used 0.2)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.unet_init is not None:  # checked before the VAE stages spend their minutes
        for part in ("unet", "text_encoder"):
            if not (args.unet_init / part / "config.json").is_file():
                p.error(f"--unet-init {args.unet_init}: no {part}/config.json there; pass a diffusers model folder "
                        "such as assets/shapes-sd")

    refuse_pickled_states(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    log(f"args: {vars(args)}")
    device = torch.device(args.device)
    write_tokenizer(args.out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(args.out / "tokenizer")
    vae = train_vae(args.out, args, device, log).requires_grad_(False)
    unet, text_encoder = train_unet(args.out, args, vae, tokenizer, device, log)
    vae = finetune_decoder(args.out, args, vae, device, log)
    # A fresh copy: batch tokenization with padding leaves the fast tokenizer padding by default, which
    # would be saved into tokenizer.json.
    tokenizer = CLIPTokenizer.from_pretrained(args.out / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out / "model", safe_serialization=True)
    log(f"done: {args.out / 'model'}")


if __name__ == "__main__":
    main()
