"""Multi-concept fusion on the Shapes model (issue #17): two subjects trained apart, then shown together.

    python bench/fusion_quality.py [--steps 600] [--seeds 4] [--guidance 3 7.5] [--work runs/fusion]
    python bench/fusion_quality.py --only merge_time     # 5 orthogonal LoRAs merged on the full SD 1.5 layout
    python bench/fusion_quality.py --only memory         # LoRA-Composer's peak memory with 1, 2 and 4 concepts
    python bench/fusion_quality.py --only memory --memory-layout sd15 --memory-repeats 1 --sample-steps 2
                                                         # the same on SD 1.5's full-size UNet at 512 px
    python bench/fusion_quality.py --only ceiling        # both present with the base's own words (no training)
    python bench/fusion_quality.py --only crosstalk      # what each trained delta adds on each concept's prompts

Subjects (default): an orange triangle ("sks") and a purple square ("zkz"), new words for things the base draws;
`--subjects orange:star:sks purple:cross:zkz` takes shapes the base draws only unnamed (SHAPES.md, "Seen but
unnamed"). Each is trained alone on 5 renders (--subject-images) with prior preservation, as a plain LoRA and
as an orthogonal LoRA (attention layers, rank 4, the same steps and learning rate; the orthogonal ones take slots
0 and 1 of one registry). The Shapes analyzer scores, at each CFG scale:
- single: each concept's own prompts ("a sks on the left", ... at three positions), colour and shape right,
  with its adapter alone (weight 1), then with both merged (each method's default weight: 1 for LoRA, the naive
  sum; 0.6 for orthogonal LoRA, as published): the drop is the crosstalk;
- both present: "a sks on the left and a zkz on the right", both right on their own sides, with the merged
  weights and with LoRA-Composer (a 24 x 32 px box around each side's position, each with its concept's region
  prompt, the rest of the canvas the global prompt's);
- the identity-swap matrix: what each side shows (sks, zkz, or something else) in those images.
Targets: orthogonal drop <= 5 points and smaller than LoRA's; both-present >= 70 % with LoRA-Composer and above
the merged weights'; merging 5 concepts < 1 s; LoRA-Composer's peak memory with 4 concepts <= 1.15x with 1.
The ceiling (--only ceiling) is the yardstick's share: "both present" for objects the base names (every ordered
pair of its shapes in the subjects' colours), by the plain two-object prompt and by the composer with the same boxes
and settings and concepts that change nothing (LoRAs with B = 0, their triggers the objects' words), so no
adapter's quality enters.
The crosstalk (--only crosstalk, on the adapters already in --work) is what orthogonal merging assumes away: the
base UNet samples each concept's prompts, and at every adapted module the other concept's delta applied to the
recorded input is compared with the concept's own (norms summed over the run, per kind of layer).
Options: --target attn_ff and --rank (both methods), --ortho-lr (orthogonal LoRA's own rate: only its B trains),
--subject-images 40 --subject-backgrounds every (customize_quality's subject set), --uncond off (single and merged
scored with the adapters off the unconditional rows, as bench/customize_quality.py scores a held-out subject).
Adapters are kept in --work: a second run skips their training.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from customize_quality import regularisation_set, subject_set
from tensor_memory import TensorPeak
from text_encoding_memory import full_size
from tuner_cost import peak_memory_bytes, reset_peak_memory

from adapters import LoRA, LoRAConfig, OrthoLoRA, OrthoLoRAConfig, merge_into, save_adapter
from adapters.composer import delta_term
from adapters.context import CallContext
from pipelines import generate, load_model
from pipelines.architectures import build_unet
from pipelines.attach import read_adapter
from pipelines.compose import ComposeRegion, ComposerSettings, compose
from pipelines.train import TrainConfig, train
from studio.shapes.analyzer import analyze
from studio.shapes.world import BASE_SHAPES, POSITIONS, Scene, ShapeObject

# Two subjects as new words for things the base draws (a DreamBooth subject is something the model can draw but has
# no word for). The held-out shapes (--subjects orange:star:sks purple:cross:zkz) score 0-4 % single-concept
# fidelity here at rank 4 on attention, adapters on every row; on attention and feed-forward layers with 40 images,
# off the unconditional rows, LoRA draws its own 100 % and orthogonal LoRA 83 %, and merging drops them to 58 % and
# 0 % (docs/benchmarks.md, session 22).
SUBJECTS = (("orange", "triangle", "sks"), ("purple", "square", "zkz"))
METHODS = {"lora": LoRA, "ortho_lora": OrthoLoRA}
SIDES = ("left", "right")
# Each concept's box: 24 x 32 px around its side's position (the object's 20 px and its jitter), the rest of the
# canvas left to the global prompt, as an artist draws one box per concept. Boxes tiling the canvas (its two halves,
# the bench's boxes until session 22) leave no cell to the global prompt: there, with no concept at all, regional
# prompting draws one object in 8 of 8 images, where these boxes draw both in 7 of 8 (docs/benchmarks.md).
BOX_HALF_SIZE = (12, 16)


def caption(objects: list[tuple[tuple[str, str, str], str]]) -> str:
    """The world's caption of the subjects at those positions, each "colour shape" replaced by its trigger."""
    text = Scene(tuple(ShapeObject(color, shape, position) for (color, shape, _), position in objects)).caption()
    for color, shape, trigger in (subject for subject, _ in objects):
        text = text.replace(f"{color} {shape}", trigger)
    return text


def adapter_file(work: Path, method: str, trigger: str) -> Path:
    """Where `train_concepts` keeps a subject's adapter of one method."""
    return work / "runs" / f"{method}-{trigger}" / f"{method}-{trigger}.safetensors"


def train_concepts(pipe, subjects, work: Path, steps: int, lrs: dict[str, float], options: dict,
                   instance_prompt_share: float = 0.0, images: int = 5,
                   every_background: bool = False) -> dict[str, list[Path]]:
    """method -> the two subjects' adapter files, trained unless already in `work`, each on `images` renders (with
    every background shown if asked); a share of each subject's images is trained on its bare instance prompt
    "a <trigger>" (instance_prompt_share). Both methods take the same `options` (rank, target); `lrs` per method."""
    regularisation_set(work / "data" / "reg")
    files: dict[str, list[Path]] = {}
    for method in METHODS:
        for subject in subjects:
            trigger = subject[2]
            name = f"{method}-{trigger}"
            path = adapter_file(work, method, trigger)
            if not path.exists():
                subject_set(work / "data" / trigger, subject=subject, images=images, every_background=every_background)
                t0 = time.time()
                train(pipe, TrainConfig(
                    data_dir=work / "data" / trigger, output_dir=path.parent, method=method,
                    method_options=dict(options), name=name, trigger=trigger, class_prompt="a shape",
                    class_dir=work / "data" / "reg", num_class_images=64, steps=steps, batch_size=4,
                    learning_rate=lrs[method], checkpoint_every=0, seed=0,
                    instance_prompt=f"a {trigger}", instance_prompt_share=instance_prompt_share,
                    library_dir=work / "library"))
                print(f"trained {name}: {time.time() - t0:.0f}s", flush=True)
            files.setdefault(method, []).append(path)
    return files


def _is(obj, subject: tuple[str, str, str]) -> bool:
    return (obj.color, obj.shape) == subject[:2]


def single_rate(images: list, subject: tuple[str, str, str]) -> list[bool]:
    """Each image's largest object is the subject (colour and shape)."""
    found = [analyze(image).objects for image in images]
    return [bool(objects) and _is(objects[0], subject) for objects in found]


def side_identity(image, subjects) -> tuple[str, str]:
    """What each half shows: the trigger of the subject its largest object is, "other", or "none"."""
    out = []
    for side in SIDES:
        objects = [o for o in analyze(image).objects if (o.center[0] < 32) == (side == "left")]
        match = [s[2] for s in subjects if objects and _is(objects[0], s)]
        out.append(match[0] if match else ("other" if objects else "none"))
    return out[0], out[1]


def evaluate(model, subjects, files: dict[str, list[Path]], seeds: int, guidance: float, steps: int,
             settings: ComposerSettings, on_uncond: bool = True, first_seed: int = 0) -> dict[str, dict]:
    """on_uncond=False scores every mode with the adapters off the unconditional rows (`generate`'s and
    `compose`'s adapters_on_uncond=False), "merged" then being both adapters as branches at their merge weights:
    the sum `merge_into` folds, on the conditional rows only."""
    results = {}
    common = dict(seed=first_seed, num_images_per_prompt=seeds, num_inference_steps=steps, guidance_scale=guidance)

    def merged(prompt: str, paths: list[Path], regions=()):
        return compose(model, prompt, adapters=[(p, None) for p in paths], regions=regions, mode="merge",
                       adapters_on_uncond=on_uncond, **common)

    for method, paths in files.items():
        row: dict = {"single": [], "merged": []}
        for subject, path in zip(subjects, paths):
            prompts = [caption([(subject, p)]) for p in ("left", "right", "center")]
            for prompt in prompts:
                alone = generate(model, prompt, adapters=[(path, 1.0)], adapters_on_uncond=on_uncond, **common)
                row["single"] += single_rate(alone.images, subject)
                row["merged"] += single_rate(merged(prompt, paths).images, subject)
        both = caption([(subjects[0], "left"), (subjects[1], "right")])
        regions = [ComposeRegion(box(side), caption([(subject, side)])) for subject, side in zip(subjects, SIDES)]
        row["merge"] = [side_identity(image, subjects) for image in merged(both, paths, regions).images]
        composed = compose(model, both, adapters=[(p, None) for p in paths], regions=regions, mode="composer",
                           composer=settings, adapters_on_uncond=on_uncond, **common)
        row["composer"] = [side_identity(image, subjects) for image in composed.images]
        results[method] = row
    return results


def ceiling(model, colours: tuple[str, str], work: Path, seeds: int, guidance: float, steps: int,
            settings: ComposerSettings, on_uncond: bool = True, first_seed: int = 0) -> None:
    """Both present for objects the base names, by the plain prompt and by the composer with blank concepts (files
    whose trigger words are their side's "colour shape", which the composer steers into the box, as a trigger)."""
    blank = []
    for colour in colours:  # B starts at 0: no delta
        words = [f"{colour} {shape}" for shape in BASE_SHAPES]
        path = save_adapter(LoRA.from_unet(model.pipe.unet, LoRAConfig(rank=4)),
                            work / "ceiling" / f"blank-{colour}.safetensors", trigger_words=words)
        blank.append((path, None))
    common = dict(seed=first_seed, num_images_per_prompt=seeds, num_inference_steps=steps, guidance_scale=guidance)
    sides: dict[str, list[tuple[bool, bool]]] = {"prompt": [], "composer": []}
    for shapes in itertools.permutations(BASE_SHAPES, 2):
        subjects = [(colour, shape, f"{colour} {shape}") for colour, shape in zip(colours, shapes)]
        both = caption(list(zip(subjects, SIDES)))
        regions = [ComposeRegion(box(side), caption([(subject, side)])) for subject, side in zip(subjects, SIDES)]
        images = {"prompt": generate(model, both, **common).images,
                  "composer": compose(model, both, adapters=blank, regions=regions, mode="composer",
                                      composer=settings, adapters_on_uncond=on_uncond, **common).images}
        for mode, shown in images.items():
            sides[mode] += [(left == subjects[0][2], right == subjects[1][2])
                            for left, right in (side_identity(image, subjects) for image in shown)]
        print(f"  {both}: prompt {sum(map(all, sides['prompt'][-seeds:]))}/{seeds}, "
              f"composer {sum(map(all, sides['composer'][-seeds:]))}/{seeds}", flush=True)
    print(f"\nceiling at CFG {guidance:g} ({len(sides['prompt'])} images each; composer: {settings.params()})")
    for mode, hits in sides.items():
        print(f"  {mode:9s} both present {_pct([all(h) for h in hits]):5.1f}%  left {_pct([h[0] for h in hits]):5.1f}%"
              f"  right {_pct([h[1] for h in hits]):5.1f}%")


LAYER_KINDS = (("cross-attention k, v", (".attn2.to_k", ".attn2.to_v")), ("cross-attention q, out", (".attn2.",)),
               ("self-attention", (".attn1.",)), ("feed-forward", (".ff.",)), ("other", ("",)))


def delta_norms(model, prompts: list[str], own, other, seeds: int, guidance: float, steps: int,
                first_seed: int) -> dict[str, list[float]]:
    """kind of layer -> [sum of ||own delta(x)||, of ||other delta(x)||, of ||base output||] over the adapted modules'
    inputs x while the base UNet samples `prompts` (conditional rows of the guided batch)."""
    modules = dict(model.pipe.unet.named_modules())
    adapted = [set(own.delta_weights()), set(other.delta_weights())]  # the weights each one changes
    context, sums = CallContext(rows=[]), {}  # no per-row scales: the delta on every row given

    def recorder(name: str):
        kind = next(k for k, parts in LAYER_KINDS if any(part in name for part in parts))

        def record(module, args, output):
            x, y = args[0][args[0].shape[0] // 2:], output[output.shape[0] // 2:]
            total = sums.setdefault(kind, [0.0, 0.0, 0.0])
            for slot, adapter in enumerate((own, other)):
                if name in adapted[slot]:
                    total[slot] += float(delta_term(module, x, adapter, name, context).norm())
            total[2] += float(y.norm())
        return record

    hooks = [modules[name.removesuffix(".weight")].register_forward_hook(recorder(name))
             for name in sorted(adapted[0] | adapted[1])]
    try:
        for prompt in prompts:
            generate(model, prompt, seed=first_seed, num_images_per_prompt=seeds, num_inference_steps=steps,
                     guidance_scale=guidance)
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def crosstalk(model, subjects, files: dict[str, list[Path]], seeds: int, guidance: float, steps: int,
              first_seed: int = 0) -> None:
    """Per method and kind of layer, on each concept's prompts (left and right): the other concept's delta against
    its own (orthogonal adaptation's no-crosstalk claim needs this near 0), and the own delta against the base."""
    print(f"\ncrosstalk at CFG {guidance:g} ({seeds} images per prompt, conditional rows, base UNet)")
    for method, paths in files.items():
        adapters = [read_adapter(f"{method} {s[2]}", path, model.pipe.unet) for s, path in zip(subjects, paths)]
        for i, subject in enumerate(subjects):
            prompts = [caption([(subject, side)]) for side in SIDES]
            sums = delta_norms(model, prompts, adapters[i], adapters[1 - i], seeds, guidance, steps, first_seed)
            for kind, _ in LAYER_KINDS:
                if kind in sums:
                    own, other, base = sums[kind]
                    print(f"{method:11s} prompts of {subject[2]}: {kind:22s} other / own {other / own:5.2f}   "
                          f"own / base output {own / base:5.2f}")


def box(position: str) -> tuple[int, int, int, int]:
    """The concept box around a world position, in pixels (x0, y0, x1, y1)."""
    (x, y), (dx, dy) = POSITIONS[position], BOX_HALF_SIZE
    return x - dx, y - dy, x + dx, y + dy


def _pct(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / max(len(hits), 1)


def report(results: dict[str, dict], subjects, guidance: float) -> None:
    print(f"\nCFG {guidance:g}")
    print(f"{'method':11s} {'single':>7s} {'merged':>7s} {'drop':>6s} {'both (merge)':>13s} {'both (composer)':>16s}")
    for method, row in results.items():
        single, merged = _pct(row["single"]), _pct(row["merged"])
        both = {mode: _pct([sides == (subjects[0][2], subjects[1][2]) for sides in row[mode]])
                for mode in ("merge", "composer")}
        print(f"{method:11s} {single:6.1f}% {merged:6.1f}% {single - merged:+6.1f} {both['merge']:12.1f}% "
              f"{both['composer']:15.1f}%")
    print("identity-swap matrix (rows: what the left | right half shows; counts over the two-subject images)")
    for method, row in results.items():
        for mode in ("merge", "composer"):
            cells = []
            for i, side in enumerate(SIDES):
                shown = [sides[i] for sides in row[mode]]
                kinds = (subjects[0][2], subjects[1][2], "other", "none")
                cells.append(f"{side}: " + " ".join(f"{k}={shown.count(k)}" for k in kinds))
            print(f"  {method:11s} {mode:9s} " + " | ".join(cells))


def merge_time(n: int = 5, rank: int = 20) -> None:
    """Seconds to merge (and restore) n rank-`rank` adapters into a random full-size SD 1.5 UNet, orthogonal
    LoRAs (slots 0..n-1) and plain LoRAs side by side."""
    unet = build_unet("sd15")
    g = torch.Generator().manual_seed(0)
    for label, make in (("ortho_lora", lambda k: OrthoLoRA.from_unet(unet, OrthoLoRAConfig(rank=rank, slot=k))),
                        ("lora", lambda k: LoRA.from_unet(unet, LoRAConfig(rank=rank)))):
        adapters = [make(k) for k in range(n)]
        with torch.no_grad():
            for adapter in adapters:
                for b in adapter.lora_B.values():
                    b.weight.normal_(0, 0.01, generator=g)
        times = []
        for _ in range(3):  # the best of 3: the machine may be busy with something else
            t0 = time.perf_counter()
            merged = merge_into(unet, [(a, None) for a in adapters])
            t1 = time.perf_counter()
            merged.restore()
            times.append((t1 - t0, time.perf_counter() - t1))
        merge_s, restore_s = min(times)
        print(f"merge {n} {label} (rank {rank}) into SD 1.5 (random weights, fp32, {torch.get_num_threads()} "
              f"threads): {merge_s:.3f}s, restore {restore_s:.3f}s (best of 3)", flush=True)


def composer_memory_child(work: Path, count: int, steps: int, settings: ComposerSettings, layout: str) -> None:
    """One composer call with `count` concepts, all read or made before: its peak memory above the loaded model and
    adapters, printed as bytes, tensors then RSS. layout "shapes": the embedded model, the trained LoRAs then random
    ones; "sd15": SD 1.5's full-size UNet (random weights) at 512 px, random rank-4 LoRAs."""
    if layout == "shapes":
        model = load_model("assets/shapes-sd", device="cpu")
        pipe = model.pipe
    else:
        model = pipe = sd15_pipeline()
    trained = sorted((work / "runs").glob("lora-*/*.safetensors")) if layout == "shapes" else []
    adapters = []
    for k in range(count):
        if k < len(trained):
            adapters.append((read_adapter(f"adapters[{k}]", trained[k], pipe.unet), None))
        else:
            lora = LoRA.from_unet(pipe.unet, LoRAConfig(rank=4))
            for up in lora.lora_B.values():  # every adapted weight changed, as a trained concept's are
                torch.nn.init.normal_(up.weight, 0, 0.01)
            adapters.append((lora, None))
    quadrants = [(0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 64), (32, 32, 64, 64)]
    boxes = [(0, 0, 32, 64)] if count == 1 else [(0, 0, 32, 64), (32, 0, 64, 64)] if count == 2 else quadrants
    scale = pipe.unet.config.sample_size * pipe.vae_scale_factor // 64  # the boxes are the 64 px canvas's
    regions = [ComposeRegion(tuple(v * scale for v in box), f"a shape {k}") for k, box in enumerate(boxes[:count])]
    base = reset_peak_memory(torch.device("cpu"))
    with TensorPeak() as tensors:
        compose(model, "shapes", adapters=adapters, regions=regions, seed=0, num_inference_steps=steps,
                composer=settings)
    print(tensors.peak, peak_memory_bytes(torch.device("cpu")) - base)


def sd15_pipeline():
    """SD 1.5's full-size UNet layout (random weights, 512 px) and text encoder (text_encoding_memory's): the
    composer's memory on a real layout."""
    pipe = full_size("SD 1.5", torch.float32)
    pipe.register_modules(unet=build_unet("sd15"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def composer_memory(work: Path, steps: int, options: list[str], repeats: int = 5, layout: str = "shapes") -> None:
    """Per concept count, the peak of the tensors the call holds at once (exact: the same in every process; what a
    GPU's allocator counts) and the median peak RSS over `repeats` fresh processes (which varies by a few MiB with
    where the allocator happens to place things, as much as one concept adds)."""
    tensors, rss, spreads = {}, {}, {}
    for count in (1, 2, 4):
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(count), "--work", str(work),
                                  "--sample-steps", str(steps), "--memory-layout", layout, *options],
                                 capture_output=True, text=True, check=True)
            runs.append([int(v) for v in out.stdout.strip().splitlines()[-1].split()])
        tensors[count] = statistics.median(r[0] for r in runs)
        rss[count] = statistics.median(r[1] for r in runs)
        spreads[count] = (min(r[1] for r in runs), max(r[1] for r in runs))
    print(f"LoRA-Composer peak memory above the loaded model and adapters, {layout} layout, 1 image, {steps} steps"
          f"{', ' + ' '.join(options) if options else ''}:")
    print("  tensors held at once: " + ", ".join(f"{c} concepts {b / 2**20:.2f} MiB ({b / tensors[1]:.3f}x)"
                                              for c, b in tensors.items()))
    print(f"  CPU RSS (median of {repeats} fresh processes): " + ", ".join(
        f"{c} concepts {b / 2**20:.1f} MiB ({b / rss[1]:.2f}x; runs {lo / 2**20:.1f}-{hi / 2**20:.1f})"
        for (c, b), (lo, hi) in zip(rss.items(), spreads.values())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="training steps of every adapter")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ortho-lr", type=float, default=None,
                   help="orthogonal LoRA's rate (default: --lr); only its B trains, so at LoRA's rate it learns "
                        "less (docs/benchmarks.md, session 17: 3-10x brings it level)")
    p.add_argument("--rank", type=int, default=4, help="rank of both methods")
    p.add_argument("--target", choices=["attn", "attn_ff"], default="attn",
                   help="the layers both methods adapt (attn_ff: kohya's LoRA, which learns a held-out subject from "
                        "40 images in bench/customize_quality.py)")
    p.add_argument("--uncond", choices=["on", "off"], default="on",
                   help="off: score every mode with the adapters off the unconditional rows")
    p.add_argument("--every-delta", action="store_true",
                   help="the composer applies each concept's other deltas in its box too (ComposerSettings)")
    p.add_argument("--cells", choices=["inside", "touched"], default="inside",
                   help="the composer's box cells at each resolution (ComposerSettings)")
    p.add_argument("--no-reinit", dest="reinitialise", action="store_false",
                   help="the composer keeps the initial noise as drawn (ComposerSettings)")
    p.add_argument("--subject-backgrounds", choices=["drawn", "every"], default="drawn",
                   help="every: each subject shown on every background (customize_quality's subject_set)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt (at most 16; --first-seed for more)")
    p.add_argument("--first-seed", type=int, default=0, help="the first image's seed (image i: this + i)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the evaluation images")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 7.5])
    p.add_argument("--step-size", type=float, default=ComposerSettings().step_size, help="the composer's latent step")
    p.add_argument("--early-stop-from", type=int, default=ComposerSettings().min_refine_steps,
                   help="the composer's first step where an image's updates may stop (its loss rising)")
    p.add_argument("--instance-prompt-share", type=float, default=0.0,
                   help="share of each subject's images trained on 'a <trigger>' (TrainConfig; session 13's recipe)")
    p.add_argument("--subject-images", type=int, default=5,
                   help="renders per subject (customize_quality's subject_set; 20 meet the subject targets there)")
    p.add_argument("--subjects", nargs=2, default=[":".join(s) for s in SUBJECTS], metavar="COLOUR:SHAPE:TRIGGER",
                   help="the two subjects (default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("runs/fusion"))
    p.add_argument("--only", choices=["quality", "merge_time", "memory", "ceiling", "crosstalk"], default=None)
    p.add_argument("--memory-layout", choices=["shapes", "sd15"], default="shapes",
                   help="--only memory on the embedded model, or on SD 1.5's full-size UNet (random weights, 512 px)")
    p.add_argument("--memory-repeats", type=int, default=5, help="--only memory: fresh processes per count (RSS)")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    settings = ComposerSettings(step_size=args.step_size, min_refine_steps=args.early_stop_from,
                                every_delta=args.every_delta, cells=args.cells, reinitialise=args.reinitialise)
    if args.memory_child is not None:
        composer_memory_child(args.work, args.memory_child, args.sample_steps, settings, args.memory_layout)
        return
    if args.only in (None, "quality"):
        model = load_model("assets/shapes-sd")
        model.pipe.set_progress_bar_config(disable=True)
        subjects = [tuple(text.split(":")) for text in args.subjects]
        lrs = {"lora": args.lr, "ortho_lora": args.lr if args.ortho_lr is None else args.ortho_lr}
        options = {"rank": args.rank, "target": args.target}
        files = train_concepts(model.pipe, subjects, args.work, args.steps, lrs, options, args.instance_prompt_share,
                               args.subject_images, args.subject_backgrounds == "every")
        print(f"subjects: {', '.join(f'{t} = {c} {s}' for c, s, t in subjects)}")
        for guidance in args.guidance:
            report(evaluate(model, subjects, files, args.seeds, guidance, args.sample_steps, settings,
                            args.uncond == "on", args.first_seed), subjects, guidance)
        print(f"\n{args.steps} steps x batch 4 (+ prior batch), lr {lrs}, rank {args.rank} on {args.target}, "
              f"instance prompt share {args.instance_prompt_share:g}, {args.subject_images} images per subject "
              f"({args.subject_backgrounds} backgrounds); adapters {args.uncond} the unconditional rows; "
              f"{args.seeds} seeds, {args.sample_steps} DDIM steps; composer: {settings.params()}; "
              f"{torch.get_num_threads()} threads")
    if args.only == "ceiling":
        model = load_model("assets/shapes-sd")
        model.pipe.set_progress_bar_config(disable=True)
        colours = tuple(text.split(":")[0] for text in args.subjects)
        for guidance in args.guidance:
            ceiling(model, colours, args.work, args.seeds, guidance, args.sample_steps, settings, args.uncond == "on",
                    args.first_seed)
    if args.only == "crosstalk":
        model = load_model("assets/shapes-sd")
        model.pipe.set_progress_bar_config(disable=True)
        subjects = [tuple(text.split(":")) for text in args.subjects]
        files = {method: [adapter_file(args.work, method, s[2]) for s in subjects] for method in METHODS}
        missing = [str(path) for paths in files.values() for path in paths if not path.exists()]
        if missing:
            sys.exit(f"--only crosstalk reads the trained adapters in --work; missing: {', '.join(missing)}. Train "
                     "them with --only quality and the same --work and --subjects first")
        for guidance in args.guidance:
            crosstalk(model, subjects, files, args.seeds, guidance, args.sample_steps, args.first_seed)
    if args.only in (None, "merge_time"):
        merge_time()
    if args.only in (None, "memory"):
        options = ["--every-delta"] * args.every_delta + ["--cells", args.cells, "--step-size", str(args.step_size),
                                                          "--early-stop-from", str(args.early_stop_from)]
        composer_memory(args.work, args.sample_steps, options, args.memory_repeats, args.memory_layout)


if __name__ == "__main__":
    main()
