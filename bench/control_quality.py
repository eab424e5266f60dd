"""Controllable generation on the Shapes model: a CSC-Tuner trained on Canny edges, scored by the analyzer.

    python bench/control_quality.py [--steps 3000] [--images 400] [--seeds 2] [--work runs/control]

Training: `--images` random single-object renders (base shapes, filled, every colour, position, size and
background), each with its world caption minus the position phrase (where the object is comes from the
hint alone), and its Canny edges drawn by the training loop; half the captions dropped (ControlNet's
recipe: the controller must read the hint); `studio train --method csc_tuner` does the same.
Evaluation: a control image of each base shape at each position (default and large size, one colour)
and a prompt naming *another* colour and no position ("a large blue triangle"); per image
- IoU between the generated object (the analyzer's mask of the largest object) and the control's shape;
- colour accuracy against the prompt's colour (the text must still choose what the edges cannot say).
Printed next to the same prompts without control (what the text alone gives) and against the targets
(issue #5): IoU >= 0.7, colour >= 85 %. Then the controller's size against a ControlNet-style trainable
encoder copy on the full SD 1.5 layout (parameters, and their fp32 weights + gradients + AdamW state;
the measured training memory of both is a row of bench/tuner_cost.py).
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapters import CSCTuner, CSCTunerConfig, load_adapter
from pipelines import ControlSpec, generate, load_model
from pipelines.architectures import build_unet
from pipelines.train import TrainConfig, train
from studio.shapes.analyzer import analyze
from studio.shapes.dataset import write_scenes
from studio.shapes.world import BASE_SHAPES, COLORS, POSITIONS, Scene, ShapeObject, render, sample_scene

POSITION_PHRASE = re.compile(r" on the (left|right|top|bottom)")
CONTROL_COLOR = "red"  # the colour of every control render; prompts name the others
OPTIONS = {"condition": "canny", "dense_kernel": 3}  # the released configuration
ADAM_BYTES_PER_PARAM = 16  # fp32 weight + gradient + two AdamW moments


def without_position(caption: str) -> str:
    return POSITION_PHRASE.sub("", caption)


def training_set(out: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, BASE_SHAPES, two_object_prob=0.0) for _ in range(n)]
    for path, scene in zip(write_scenes(out, scenes), scenes):
        path.with_suffix(".txt").write_text(without_position(scene.caption()))


def control_cases() -> list[tuple[Scene, str, str]]:
    """(control scene, prompt, prompted colour): every base shape x position x {default, large} size."""
    others = [c for c in COLORS if c != CONTROL_COLOR]
    cases = []
    for i, (shape, position, size) in enumerate(
            (s, p, z) for s in BASE_SHAPES for p in POSITIONS for z in (None, "large")):
        control = Scene((ShapeObject(CONTROL_COLOR, shape, position, size),), jitter=((0, 0),))
        color = others[i % len(others)]
        prompt = without_position(Scene((ShapeObject(color, shape, position, size),)).caption())
        cases.append((control, prompt, color))
    return cases


def score(model, cases, seeds: list[int], steps: int, controller: CSCTuner | None) -> dict[str, float]:
    ious, colors = [], []
    for control, prompt, color in cases:
        truth = analyze(render(control)).objects[0].mask
        spec = [ControlSpec("canny", render(control), adapter=controller)] if controller is not None else []
        for seed in seeds:
            image = generate(model, prompt, seed=seed, num_inference_steps=steps, control=spec).images[0]
            objects = analyze(image).objects
            got = objects[0].mask if objects else np.zeros_like(truth)
            ious.append((got & truth).sum() / max((got | truth).sum(), 1))
            colors.append(bool(objects) and objects[0].color == color)
    return {"iou": float(np.mean(ious)), "color": float(np.mean(colors)), "n": len(ious)}


def size_against_controlnet() -> None:
    """Parameters of the CSC-Tuner and of a ControlNet-style encoder copy on SD 1.5 (meta tensors: no memory)."""
    from diffusers import ControlNetModel

    unet = build_unet("sd15", device="meta")
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        counts = {f"CSC-Tuner, {k}x{k} dense chain": CSCTuner.from_unet(unet, CSCTunerConfig(dense_kernel=k))
                  .num_parameters()["total"] for k in (3, 1)}
    counts["ControlNet (trainable encoder copy)"] = sum(p.numel() for p in controlnet.parameters())
    reference = counts["ControlNet (trainable encoder copy)"]
    print(f"\n{'SD 1.5 layout':36s} {'trainable':>10s} {'of ControlNet':>13s} {'fp32+grad+AdamW':>16s}")
    for name, n in counts.items():
        print(f"{name:36s} {n / 1e6:8.1f} M {n / reference:13.1%} {n * ADAM_BYTES_PER_PARAM / 2**30:13.2f} GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--caption-dropout", type=float, default=0.5)
    p.add_argument("--images", type=int, default=400, help="training renders")
    p.add_argument("--seeds", type=int, default=2, help="seeds per evaluation prompt")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the evaluation images")
    p.add_argument("--model", default=None)
    p.add_argument("--work", type=Path, default=None, help="data and the run here (default: a temp dir); "
                   "re-running with the same folder resumes the training")
    args = p.parse_args()

    model = load_model(args.model)
    model.pipe.set_progress_bar_config(disable=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="control-"))
    if not (work / "data").is_dir():
        training_set(work / "data", args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model {model.name}")
    config = TrainConfig(data_dir=work / "data", output_dir=work / "run", method="csc_tuner", method_options=OPTIONS,
                         name="shapes-canny", steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                         caption_dropout=args.caption_dropout, checkpoint_every=250, resume="latest")
    t0 = time.time()
    result = train(model.pipe, config)
    print(f"trained {args.steps} steps x batch {args.batch_size} on {args.images} renders in {time.time() - t0:.0f}s "
          f"(this call; final loss {np.mean(result.losses[-50:]) if result.losses else float('nan'):.4f})")

    cases = control_cases()
    seeds = list(range(args.seeds))
    controller = load_adapter(result.adapter_path, model.pipe.unet, attach=False)
    print(f"controller: {controller.num_parameters()['total'] / 1e6:.2f} M parameters on the Shapes UNet "
          f"({sum(p.numel() for p in model.pipe.unet.parameters()) / 1e6:.2f} M)")
    rows = [("text only (no control)", score(model, cases, seeds, args.sample_steps, None)),
            ("CSC-Tuner, Canny, scale 1", score(model, cases, seeds, args.sample_steps, controller))]
    print(f"\n{len(cases)} control images x {len(seeds)} seeds, {args.sample_steps} DDIM steps, CFG 7.5")
    print(f"{'':28s} {'IoU':>6s} {'colour':>7s}")
    for name, r in rows:
        print(f"{name:28s} {r['iou']:6.2f} {r['color']:7.1%}")
    iou, color = rows[1][1]["iou"], rows[1][1]["color"]
    print(f"targets: IoU >= 0.70 ({'ok' if iou >= 0.7 else 'MISSED'}), colour >= 85 % "
          f"({'ok' if color >= 0.85 else 'MISSED'})")
    size_against_controlnet()


if __name__ == "__main__":
    main()
