"""CSC-Tuner specifics (the shared adapter contracts run in tests/test_adapters.py's matrix): condition
features, the injection formula and its composition with SC-Tuner, several conditions, refusals,
parameter counts, annotators and controlled generation on the tiny SD 1.5 pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_helpers import perturb, run
from PIL import Image, ImageDraw

from adapters import (
    CallContext,
    CSCTuner,
    CSCTunerConfig,
    SCTuner,
    attached_adapters,
    call_context,
    current_context,
    load_adapter,
    read_metadata,
    save_adapter,
)
from adapters.csc_tuner import skips_from_widths
from adapters.sc_tuner import module_name
from adapters.skips import hook_skips, long_skips
from pipelines import ControlSpec, InputError, build_control_pairs, generate, parse_control_arg, prepare_hint
from pipelines.annotators import canny, color_map, hint_path_for, sketch
from pipelines.architectures import build_unet, tiny_sd15_pipeline, unet_inputs
from pipelines.loading import EMBEDDED_MODEL
from pipelines.train import TrainConfig, TrainConfigError, train
from studio.cli import main as cli_main
from studio.shapes.world import Scene, ShapeObject, render


def hint(unet, batch: int = 1, seed: int = 7) -> torch.Tensor:
    """A random control image at the UNet's pixel size (8x its latents)."""
    size = unet.config.sample_size * 8
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def condition_hint(unet, condition: str, batch: int = 1) -> torch.Tensor:
    """The fixed control image of `condition` in these tests."""
    return hint(unet, batch, seed=len(condition))


def controls(unet, **hints: torch.Tensor):
    """The call context of a 2-row UNet call controlled by `hints` (condition -> hint)."""
    return call_context(unet, CallContext.of_branches(["uncond", "cond"], hints=hints))


def tuner(unet, condition: str = "canny", seed: int | None = 0, **config) -> CSCTuner:
    """A CSC-Tuner perturbed off its zero init with `seed` (None: left at init)."""
    adapter = CSCTuner.from_unet(unet, CSCTunerConfig(condition=condition, **config))
    if seed is not None:
        perturb(adapter, seed)
    return adapter


@pytest.fixture
def unet():
    return build_unet("tiny-sd15")


@pytest.fixture
def inputs(unet) -> dict:
    return unet_inputs(unet, batch=2)


# -- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tiny-sd15", "tiny-sdxl"])
def test_condition_features_have_the_shapes_of_the_skips(layout):
    unet = build_unet(layout)
    seen: dict[str, tuple[int, ...]] = {}

    def record(key: str, x: torch.Tensor) -> None:
        seen[key] = tuple(x.shape)

    handles = hook_skips(unet, long_skips(unet), record)
    run(unet, unet_inputs(unet, batch=2))
    for handle in handles:
        handle.remove()
    features = CSCTuner.from_unet(unet).condition_features(hint(unet, batch=2))
    assert {key: tuple(c.shape) for key, c in features.items()} == seen
    assert list(features) == [s.key for s in reversed(long_skips(unet))], "chained in encoder order"


@pytest.mark.parametrize("layout", ["sd15", "sdxl", "tiny-sd15", "tiny-sdxl"])
def test_downsampled_skips_are_recovered_from_a_files_widths(layout):
    skips = long_skips(build_unet(layout, device="meta"))
    assert sum(s.downsampled for s in skips) == {"sd15": 3, "sdxl": 2}.get(layout.removeprefix("tiny-"))
    assert skips_from_widths({s.key: s.channels for s in skips}) == skips


def test_full_size_parameter_counts():
    """SCEdit's released configs (modelscope/scepter; docs/methods.md, CSC-Tuner): SD 1.5 3x3 ~ 99.1 M (pre-encoder
    0.35 M, chain 79.1 M, tuners 19.68 M), 1x1 ~ 28.8 M; SDXL 3x3 ~ 45.9 M. Exact counts of our layout, which agree
    with those to their precision."""
    sd15, sdxl = build_unet("sd15", device="meta"), build_unet("sdxl", device="meta")
    assert CSCTuner.from_unet(sd15).num_parameters() == {
        "pre_encoder": 348_880, "chain": 79_082_880, "tuners": 19_680_000, "total": 99_111_760}
    assert CSCTuner.from_unet(sd15, CSCTunerConfig(dense_kernel=1)).num_parameters()["total"] == 28_824_400
    assert CSCTuner.from_unet(sdxl).num_parameters() == {
        "pre_encoder": 1_061_600, "chain": 35_026_560, "tuners": 9_841_920, "total": 45_930_080}
    assert CSCTuner.from_unet(sdxl).config.pre_channels == 320 and CSCTuner.from_unet(sd15).config.pre_channels == 256


def test_zero_init_reaches_the_chain_progressively(unet, inputs):
    """At step 0 the whole control is zero: the last tuner layers and the chain's first conv get weight
    gradient, later chain convs only bias gradient (their input, the previous block's output, is 0)."""
    unet.requires_grad_(False)
    csc = tuner(unet, seed=None)
    csc.attach(unet)
    with controls(unet, canny=condition_hint(unet, "canny")):
        unet(**inputs).sample.square().mean().backward()
    chain = [block[1] for block in csc.chain]
    assert chain[0].weight.grad.abs().sum() > 0
    assert all(not conv.weight.grad.any() and conv.bias.grad.abs().sum() > 0 for conv in chain[1:])
    assert all(mlp.fc2.weight.grad.abs().sum() > 0 for mlp in csc.tuners.values())
    assert all(p.grad is not None for p in csc.pre_encoder.parameters())
    assert all(p.grad is None for p in unet.parameters())


def test_gradients_survive_gradient_checkpointing(unet, inputs):
    """The features must outlive the UNet's forward: checkpointing re-runs the up blocks in backward."""
    unet.requires_grad_(False)
    csc = tuner(unet)
    csc.attach(unet)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        with controls(unet, canny=condition_hint(unet, "canny")):
            unet(**inputs).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in csc.parameters()])
        csc.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# -- injection and composition --------------------------------------------------------------------


def test_sc_and_csc_compose_as_the_formula(unet, inputs):
    """x' = x + s_sc T_sc(x) + s (T_c(x + c) + c), both terms from the original x, in either attach order."""
    sc, csc = SCTuner.from_unet(unet), tuner(unet)
    canny = condition_hint(unet, "canny", batch=2)
    perturb(sc, seed=5)
    sc.set_scale(0.7)
    csc.set_scale(1.5)
    key = "2.1"
    skip = next(s for s in long_skips(unet) if s.key == key)
    resnet = unet.up_blocks[skip.block].resnets[skip.resnet]
    seen = {}

    def original(key: str, x: torch.Tensor) -> None:  # an editor adding nothing sees the original skip
        seen["x"] = x

    def edited(module, args) -> None:  # registered after the shared skip hook, so it sees the edited input
        seen["edited"] = args[0][:, -skip.channels:]

    record = hook_skips(unet, [skip], original)
    sc.attach(unet)
    csc.attach(unet)
    after = resnet.register_forward_pre_hook(edited)
    with controls(unet, canny=canny):
        sc_first = run(unet, inputs)
    after.remove()
    record[0].remove()

    x = seen["x"]
    with torch.no_grad():
        c = csc.condition_features(canny)[key]
        want = x + 0.7 * sc.tuners[module_name(key)](x) + 1.5 * (csc.tuners[module_name(key)](x + c) + c)
    torch.testing.assert_close(seen["edited"], want, atol=1e-5, rtol=1e-5)

    sc.detach()
    csc.detach()
    csc.attach(unet)
    sc.attach(unet)
    with controls(unet, canny=canny):
        assert torch.equal(run(unet, inputs), sc_first), "two editors: the order of attaching does not matter"


def test_two_conditions_with_their_own_hints_and_scales(unet, inputs):
    base = run(unet, inputs)
    edges, colors = tuner(unet, "canny", seed=1), tuner(unet, "color", seed=2)
    hints = {"canny": condition_hint(unet, "canny"), "color": condition_hint(unet, "color", batch=2)}
    edges.set_scale(0.5)
    edges.attach(unet)
    with controls(unet, **hints):
        only_edges = run(unet, inputs)
        colors.attach(unet)
        both = run(unet, inputs)
    assert attached_adapters(unet, CSCTuner) == [edges, colors]
    assert not torch.allclose(both, only_edges, atol=1e-4) and not torch.allclose(only_edges, base, atol=1e-4)
    colors.set_scale(0.0)  # off: no hint needed, nothing added
    with controls(unet, canny=hints["canny"]):
        assert torch.equal(run(unet, inputs), only_edges)
    edges.detach()
    colors.detach()
    assert torch.equal(run(unet, inputs), base) and attached_adapters(unet) == []


def test_a_smaller_vae_factor_takes_a_smaller_hint(unet, inputs):
    """The embedded Shapes model's VAE downsamples by 4: two stride-2 convs in the pre-encoder."""
    csc = CSCTuner.from_unet(unet, CSCTunerConfig(vae_scale_factor=4))
    assert sum(conv.stride == (2, 2) for conv in csc.pre_encoder[::2]) == 2
    csc.attach(unet)
    perturb(csc)
    with controls(unet, canny=torch.rand(1, 3, 32, 32)):
        assert run(unet, inputs).shape == inputs["sample"].shape


# -- refusals -------------------------------------------------------------------------------------


def test_bad_conditions_are_refused(unet, inputs):
    csc = CSCTuner.from_unet(unet)
    csc.attach(unet)
    with pytest.raises(RuntimeError, match="no control image in this call: run the UNet inside call_context"):
        run(unet, inputs)
    with controls(unet, color=hint(unet)), pytest.raises(RuntimeError, match=r"ctx.hints\['canny'\]"):
        run(unet, inputs)  # a hint of another condition is not this tuner's
    with pytest.raises(ValueError, match=r"\[0, 1\].*\(hint \+ 1\) / 2"), controls(unet, canny=hint(unet) * 2 - 1):
        pass
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"), controls(unet, canny=hint(unet)[:, :1]):
        pass
    with controls(unet, canny=torch.rand(1, 3, 32, 32)), pytest.raises(ValueError, match="need 64x64"):
        run(unet, inputs)
    with controls(unet, canny=hint(unet, batch=3)), pytest.raises(ValueError, match="not a multiple of the hint batch"):
        run(unet, inputs)


@pytest.mark.parametrize("field, value", [
    ("condition", "Canny"), ("condition", "canny:edges"), ("dense_kernel", 2), ("dense_kernel", 0),
    ("hidden_ratio", 0), ("pre_channels", 0), ("width_mult", -1.0), ("width_mult", 0.01), ("vae_scale_factor", 16),
])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=f"CSCTunerConfig.{field}"):
        CSCTunerConfig(**{field: value})


def test_the_file_records_the_condition_and_the_resolved_architecture(unet, inputs, tmp_path):
    csc = tuner(unet, "sketch", dense_kernel=1)
    path = save_adapter(csc, tmp_path / "sketch.safetensors")
    config = json.loads(read_metadata(path)["studio.config"])
    assert config == {"condition": "sketch", "dense_kernel": 1, "hidden_ratio": 1.0, "pre_channels": 32,
                      "width_mult": 1.0, "vae_scale_factor": 8}


# -- annotators -----------------------------------------------------------------------------------


def square(size: int = 64, lo: int = 16, hi: int = 47, fill: str = "white", background: str = "black"):
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).rectangle([lo, lo, hi, hi], fill=fill)
    return image


def test_canny_draws_the_border_of_a_shape():
    edges = np.asarray(canny(square(fill="red")))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    on = np.argwhere(edges[..., 0] > 0)
    # Every edge pixel lies within a pixel of the square's outline, and the outline is covered.
    dist = np.minimum(np.abs(on - 16), np.abs(on - 47)).min(axis=1)
    inside = ((on >= 15) & (on <= 48)).all(axis=1)
    assert (dist <= 1).all() and inside.all()
    assert len(on) >= 4 * 30


def test_color_map_is_a_coarse_palette():
    image = Image.new("RGB", (64, 32), "blue")
    ImageDraw.Draw(image).rectangle([0, 0, 31, 31], fill="red")
    palette = np.asarray(color_map(image, cells=4))  # 4 x 2 cells of 16 pixels
    assert palette.shape == (32, 64, 3)
    assert (palette[:, :32] == [255, 0, 0]).all() and (palette[:, 32:] == [0, 0, 255]).all()
    means = np.asarray(color_map(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), 2))
    assert len(np.unique(means.reshape(-1, 3), axis=0)) <= 4, "one colour per cell"


def test_sketch_turns_dark_strokes_on_white_into_light_strokes_on_black():
    drawing = square(lo=30, hi=33, fill="black", background="white")
    hint_image = np.asarray(sketch(drawing))
    assert (hint_image[30:34, 30:34] == 255).all() and hint_image.sum() == 16 * 3 * 255


def test_prepare_hint_is_zero_one_at_the_requested_size(tmp_path):
    path = tmp_path / "photo.png"
    square(size=96).save(path)
    t = prepare_hint(path, "canny", (64, 48))
    assert t.shape == (1, 3, 48, 64) and t.dtype == torch.float32
    assert t.min() == 0 and t.max() == 1
    assert torch.equal(prepare_hint(path, "depth", (64, 48), annotate=False)[0, 0, 0, 0], torch.tensor(0.0))
    with pytest.raises(InputError, match="no annotator for condition 'depth'.*annotate=False"):
        prepare_hint(path, "depth", (64, 48))


def test_build_control_pairs_mirrors_the_folder(tmp_path):
    data = tmp_path / "data"
    (data / "10_sks cat").mkdir(parents=True)
    square().save(data / "a.png")
    square(size=80).save(data / "10_sks cat" / "b.jpg")
    pairs = build_control_pairs(data, "canny", tmp_path / "hints", resolution=64)
    assert [(i.relative_to(data).as_posix(), h.relative_to(tmp_path).as_posix()) for i, h in pairs] == [
        ("10_sks cat/b.jpg", "hints/10_sks cat/b.png"), ("a.png", "hints/a.png")]
    assert all(h == hint_path_for(i, data, tmp_path / "hints") for i, h in pairs)
    with Image.open(pairs[1][1]) as written:
        assert written.size == (64, 64) and json.loads(written.info["studio"])["condition"] == "canny"
    assert not list((tmp_path / "hints").rglob("*.tmp")), "written atomically"
    with pytest.raises(InputError, match="lies inside image_dir"):
        build_control_pairs(data, "canny", data / "hints")



@pytest.mark.parametrize("corrupt", [b"not an image at all", "truncated"])
def test_annotate_reads_every_image_before_writing_any_hint(tmp_path, capsys, corrupt):
    """`studio annotate` over 2 good images and 1 corrupt one (sorted last) fails naming it and writes nothing."""
    data = tmp_path / "data"
    data.mkdir()
    square().save(data / "a.png")
    square(size=80).save(data / "b.png")
    if corrupt == "truncated":  # a real PNG header, its pixel data cut: only decoding finds it
        square(size=80).save(data / "c-bad.png")
        (data / "c-bad.png").write_bytes((data / "c-bad.png").read_bytes()[:60])
    else:
        (data / "c-bad.png").write_bytes(corrupt)
    assert cli_main(["annotate", str(data), "--condition", "canny", "--out", str(tmp_path / "hints")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "c-bad.png" in err
    assert not (tmp_path / "hints").exists() or not list((tmp_path / "hints").rglob("*"))
    with pytest.raises(InputError, match="c-bad.png"):
        build_control_pairs(data, "color", tmp_path / "hints")
    assert not (tmp_path / "hints").exists() or not list((tmp_path / "hints").rglob("*"))


# -- generation -----------------------------------------------------------------------------------


def test_parse_control_arg():
    assert parse_control_arg("canny:edges.png") == ControlSpec("canny", Path("edges.png"), None)
    spec = parse_control_arg("color:C:/in/a.png:0.5")
    assert (spec.condition, str(spec.image), spec.scale) == ("color", "C:/in/a.png", 0.5)
    assert str(parse_control_arg("canny:C:/in/a.png").image) == "C:/in/a.png"
    for bad in ("canny", "canny:", ":a.png", "Canny:a.png", "canny:a.png:nan"):
        with pytest.raises(InputError):
            parse_control_arg(bad)


def test_generate_with_control(tiny_sd15, tmp_path):
    """2 DDIM steps at CFG 7.5 (UNet batch 2: the hint is tiled): control changes the image, and after
    the call the pipeline is as before (tuners attached for the call are detached)."""
    pipe = tiny_sd15

    def make(**kwargs):
        return np.asarray(generate(pipe, "a red circle", seed=0, num_inference_steps=2, **kwargs).images[0])

    photo = tmp_path / "photo.png"
    square().save(photo)
    base = make()
    csc = CSCTuner.from_unet(pipe.unet)
    perturb(csc)
    path = save_adapter(csc, tmp_path / "canny.safetensors")

    by_object = make(control=[ControlSpec("canny", photo, adapter=csc)])
    assert not np.array_equal(by_object, base)
    assert csc.unet is None and current_context(pipe.unet) is None and csc.scale == 1.0
    assert np.array_equal(make(control=[ControlSpec("canny", photo, adapter=path)]), by_object)
    assert np.array_equal(make(), base)
    assert np.array_equal(make(control=[ControlSpec("canny", photo, scale=0.0, adapter=path)]), base)

    with pytest.raises(InputError, match="trained on 'canny' hints, not 'color'"):
        make(control=[ControlSpec("color", photo, adapter=path)])
    csc.attach(pipe.unet)  # already attached (e.g. from the library): found by its condition
    with pytest.raises(InputError, match=r"\['canny'\] are attached but control has no image"):
        make()
    result = generate(pipe, "a red circle", seed=0, num_inference_steps=2,
                      control=[parse_control_arg(f"canny:{photo}")])
    assert np.array_equal(np.asarray(result.images[0]), by_object) and csc.unet is pipe.unet
    assert result.settings[0].infotext().endswith("Control: canny")
    csc.detach()

    # A CSC-Tuner among generate's adapters is driven by the control of its condition, at the adapter's scale.
    assert np.array_equal(make(adapters=[(path, 1.0)], control=[ControlSpec("canny", photo)]), by_object)
    assert np.array_equal(make(adapters=[(path, 0.0)], control=[ControlSpec("canny", photo)]), base)
    with pytest.raises(InputError, match=r"control\[0\] \('canny'\): .*another UNet"):
        csc.attach(build_unet("tiny-sd15"))
        make(control=[ControlSpec("canny", photo, adapter=csc)])


# -- training a controller -----------------------------------------------------------------------


def stars(folder: Path) -> Path:
    """Three 64x64 stars at different places, uncaptioned (the trigger word captions them)."""
    folder.mkdir(parents=True)
    for i, position in enumerate(("left", "center", "right")):
        render(Scene((ShapeObject("red", "star", position, "large"),))).save(folder / f"{i}.png")
    return folder


def controller_config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(data_dir=data, output_dir=out, method="csc_tuner", method_options={"dense_kernel": 1},
                    trigger="sks", steps=4, batch_size=2, learning_rate=1e-2, checkpoint_every=0, sample_steps=2)
    return TrainConfig(**{**settings, **overrides})


def test_training_a_controller_feeds_every_image_its_own_hint(tmp_path):
    """Hints drawn while training == the same hints written by build_control_pairs; other hints change
    the run; the trained tuner answers its hint; samples are controlled."""
    data = stars(tmp_path / "data")
    pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
    drawn = train(pipe, controller_config(data, tmp_path / "a", sample_prompts=["sks"]))

    build_control_pairs(data, "canny", tmp_path / "hints", resolution=64)
    from_folder = train(pipe, controller_config(data, tmp_path / "b", hint_dir=tmp_path / "hints"))
    assert from_folder.losses == pytest.approx(drawn.losses, abs=1e-6)

    for hint_file in (tmp_path / "hints").glob("*.png"):  # the same stars, all with one (wrong) hint
        square().save(hint_file)
    other = train(pipe, controller_config(data, tmp_path / "c", hint_dir=tmp_path / "hints"))
    assert other.losses[1:] != pytest.approx(drawn.losses[1:], abs=1e-4)  # step 1's loss: the zero-init chain

    meta = read_metadata(drawn.adapter_path)
    assert meta["studio.method"] == "csc_tuner"
    assert json.loads(meta["studio.config"])["condition"] == "canny"
    assert json.loads(meta["studio.config"])["vae_scale_factor"] == pipe.vae_scale_factor
    samples = sorted((tmp_path / "a" / "samples").rglob("*.png"))
    assert [p.parent.name for p in samples] == ["step-000000", "step-000004"]
    assert "Control: canny" in Image.open(samples[-1]).text["parameters"]

    trained = load_adapter(drawn.adapter_path, pipe.unet)
    outputs = []
    for image in (data / "0.png", data / "2.png"):
        with controls(pipe.unet, canny=prepare_hint(image, "canny", (64, 64))):
            outputs.append(pipe.unet(torch.zeros(1, 4, 8, 8), 500, torch.zeros(1, 77, 32)).sample)
    trained.detach()
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4  # the hint now steers the UNet


def test_controller_training_refuses_what_cannot_work(tmp_path):
    data = stars(tmp_path / "data")
    with pytest.raises(TrainConfigError, match="num_class_images.*class images have no hints"):
        controller_config(data, tmp_path / "o", class_prompt="star", num_class_images=2)
    with pytest.raises(TrainConfigError, match="hint_dir.*is for csc_tuner"):
        controller_config(data, tmp_path / "o", method="sc_tuner", method_options={}, hint_dir=data)
    pipe = tiny_sd15_pipeline(str(EMBEDDED_MODEL / "tokenizer"))
    with pytest.raises(TrainConfigError, match="vae_scale_factor=4, but this model's vae_scale_factor is 8"):
        train(pipe, controller_config(data, tmp_path / "o", method_options={"vae_scale_factor": 4}))
    (tmp_path / "hints").mkdir()
    square().save(tmp_path / "hints" / "0.png")
    with pytest.raises(InputError, match="2 of 3 training images have no hint"):
        train(pipe, controller_config(data, tmp_path / "o", hint_dir=tmp_path / "hints"))
    with pytest.raises(InputError, match="'depth' has no annotator .*give hint_dir"):
        train(pipe, controller_config(data, tmp_path / "o", method_options={"condition": "depth"}))
    assert not (tmp_path / "o").exists()  # refused before any work
