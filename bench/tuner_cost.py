"""Training cost of the tuners on the full-size SD 1.5 UNet layout (random weights), side by side.

    python bench/tuner_cost.py [--latent 32] [--batches 1 4] [--steps 3] [--methods sc_tuner lora full]
    python bench/tuner_cost.py --methods csc_tuner controlnet lora --batches 4   # controllers (issue #5)

Each (method, batch) runs in a fresh subprocess so its peak memory is its own: the peak RSS
(CPU) or peak allocated CUDA memory during training, minus what the frozen model alone holds
("training overhead"), the median step time, and the trainable parameter count. Ratios are
printed against LoRA r=64 on q/k/v/out + feed-forward, SCEdit's baseline. The controllers (csc_tuner,
and controlnet: diffusers' ControlNetModel, a trainable copy of the encoder) also take a hint image.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

METHODS = {
    # name: (registry method, options) -- "full" and "naive_masked" are not adapters
    "sc_tuner": ("sc_tuner", {"hidden_ratio": 1.0}),
    "lora": ("lora", {"rank": 64, "alpha": 64, "target": "attn_ff"}),
    "sara": ("sara", {"threshold": 2e-3}),
    "naive_masked": (None, {"threshold": 2e-3}),
    "full": (None, {}),
    "csc_tuner": ("csc_tuner", {"condition": "canny", "dense_kernel": 3}),
    "controlnet": (None, {}),
}


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak-memory counter and return the memory in use now (the frozen model)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: resets the peak RSS (VmHWM), so building the model does not count
    return _status_kib("VmRSS") * 1024


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def trainable_setup(method: str, unet: torch.nn.Module) -> tuple[list[torch.nn.Parameter], object]:
    """Freeze the UNet and return (parameters to optimise, the attached adapter, ControlNet or None)."""
    from diffusers import ControlNetModel

    from adapters import REGISTRY

    registry_name, options = METHODS[method]
    unet.requires_grad_(False)
    if method == "full":
        unet.requires_grad_(True)
        return list(unet.parameters()), None
    if method == "controlnet":
        controlnet = ControlNetModel.from_unet(unet).to(next(unet.parameters()).device)
        return list(controlnet.parameters()), controlnet
    if method == "naive_masked":
        from adapters.sara import naive_masked_parameters

        params, _ = naive_masked_parameters(unet, options["threshold"])  # the masking hooks stay on
        return params, None
    cls = REGISTRY[registry_name]
    adapter = cls.from_unet(unet, cls.config_class(**options))
    adapter.to(next(unet.parameters()).device)
    adapter.attach(unet)
    return adapter.trainable_parameters(), adapter


def worker(method: str, batch: int, latent: int, steps: int) -> dict:
    """One method at one batch size in this process: returns the measurements as a dict."""
    from adapters import CallContext, call_context
    from pipelines.architectures import build_unet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = build_unet("sd15", seed=0).to(device)
    params, adapter = trainable_setup(method, unet)
    n_trainable = sum(p.numel() for p in params)
    # No weight decay for the masked fine-tune: decay would move its unselected entries too.
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0 if method == "naive_masked" else 1e-2)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    context_embeds = torch.randn(batch, 77, 768, generator=g).to(device)
    timestep = torch.randint(0, 1000, (batch,), generator=g).to(device)
    hint = torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g).to(device)
    base_memory = reset_peak_memory(device)
    times = []
    # The call context the pipelines would build: a controller reads its hint from it, the others nothing.
    context = CallContext.of_branches(["train"] * batch, hints={"canny": hint})
    with call_context(unet, context):
        for i in range(steps + 1):  # the first step warms up (allocator, optimizer state)
            t0 = time.perf_counter()
            if method == "controlnet":
                down, mid = adapter(sample, timestep, context_embeds, controlnet_cond=hint, return_dict=False)
                pred = unet(sample, timestep, context_embeds, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
            else:
                pred = unet(sample, timestep, context_embeds).sample
            loss = torch.nn.functional.mse_loss(pred, sample)
            if method != "controlnet" and adapter is not None and (reg := adapter.regularization_loss()) is not None:
                loss = loss + reg
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:
                times.append(time.perf_counter() - t0)
    return {"method": method, "batch": batch, "trainable": n_trainable,
            "overhead_bytes": peak_memory_bytes(device) - base_memory, "step_s": statistics.median(times),
            "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["sc_tuner", "lora", "full"], choices=list(METHODS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--latent", type=int, default=32, help="latent side (64 = 512 px images)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.latent, args.steps)))
        return

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; SD 1.5 UNet layout, random weights, {args.latent}x{args.latent} latents, "
          f"fp32, AdamW, median of {args.steps} steps")
    results = {}
    for batch in args.batches:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--worker", method, str(batch), "--latent", str(args.latent),
                   "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{method} batch {batch}: failed\n{out.stderr[-2000:]}")
                continue
            r = results[method, batch] = json.loads(out.stdout.strip().splitlines()[-1])
            # Each row as soon as it is measured: a long run cut short keeps what it measured.
            print(f"measured {method} batch {batch}: {r['trainable'] / 1e6:.2f} M trainable, "
                  f"{r['overhead_bytes'] / 2**30:.2f} GB, {r['step_s']:.2f} s/step", flush=True)
    print(f"\n{'method':14s} {'batch':>5s} {'trainable':>12s} {'train mem':>10s} {'step':>8s} "
          f"{'mem/LoRA':>9s} {'time/LoRA':>10s}")
    for (method, batch), r in results.items():
        base = results.get(("lora", batch))
        mem_ratio = f"{r['overhead_bytes'] / base['overhead_bytes']:.2f}x" if base else "-"
        time_ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "-"
        print(f"{method:14s} {batch:5d} {r['trainable'] / 1e6:10.2f} M {r['overhead_bytes'] / 2**30:8.2f} GB "
              f"{r['step_s']:7.2f}s {mem_ratio:>9s} {time_ratio:>10s}")


if __name__ == "__main__":
    main()
