"""Checkpoints out (pipelines/export.py, `studio checkpoint export`): base + merged adapters as one single-file
`.safetensors` in the original SD layout, read back by diffusers' single-file loader and by `load_model`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from adapter_helpers import perturb
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from adapters import LoRA, LoRAConfig, SCTuner, save_adapter
from pipelines import EMBEDDED_MODEL, generate, load_model
from pipelines.architectures import build_unet, unet_inputs
from pipelines.attach import attached
from pipelines.errors import StudioError
from pipelines.export import check_family, export_checkpoint
from pipelines.loading import LoadedModel, file_hash
from studio.cli import main as cli_main


def header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


@pytest.fixture
def lora_file(embedded, tmp_path) -> Path:
    lora = LoRA.from_unet(embedded.pipe.unet, LoRAConfig(rank=4))
    perturb(lora, seed=1)
    return save_adapter(lora, tmp_path / "sks.safetensors")


def test_export_with_a_lora_at_0_8_reloads_both_ways_and_generates_as_the_attached_lora(embedded, lora_file,
                                                                                       tmp_path):
    before = {k: v.clone() for k, v in embedded.pipe.unet.state_dict().items()}
    out = export_checkpoint(embedded, tmp_path / "shapes-sks.safetensors", adapters=[(lora_file, 0.8)])

    # The model itself is untouched, bit for bit.
    assert all(torch.equal(before[k], v) for k, v in embedded.pipe.unet.state_dict().items())

    meta, shapes = header(out)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in shapes)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.prediction_type"] == "epsilon"
    assert f'Lora hashes: "sks: {file_hash([lora_file])}"' in meta["parameters"]
    merged = json.loads(meta["studio.merged_adapters"])
    assert merged == [{"name": "sks", "hash": file_hash([lora_file]), "scale": 0.8, "method": "lora"}]

    # The reference: the base with the LoRA attached at 0.8 for the call.
    kwargs = dict(num_inference_steps=4, seed=5, guidance_scale=5.0)
    reference = generate(embedded, "a red circle", adapters=[(lora_file, 0.8)], **kwargs).images[0]
    inputs = unet_inputs(embedded.pipe.unet)
    with attached(embedded.pipe.unet, [(lora_file, 0.8)]), torch.no_grad():
        reference_out = embedded.pipe.unet(**inputs).sample

    studio = load_model(out, device="cpu", dtype=torch.float32, config=EMBEDDED_MODEL)
    diffusers_pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(EMBEDDED_MODEL),
                                                              local_files_only=True)
    for pipe in (studio.pipe, diffusers_pipe):
        with torch.no_grad():
            assert (pipe.unet(**inputs).sample - reference_out).abs().max() <= 1e-4
        image = generate(pipe, "a red circle", **kwargs).images[0]
        assert np.abs(pixels(image) - pixels(reference)).max() <= 1 / 255  # the same 8-bit image, up to rounding


def test_standard_sd15_layout_gets_the_original_names_and_round_trips(tiny_sd15, tmp_path):
    """The tiny SD 1.5 layout (4 levels, 2 layers each) lands on the LDM names A1111 and ComfyUI expect, and
    diffusers' loader gives back every weight."""
    config_dir = tmp_path / "config"
    tiny_sd15.save_pretrained(config_dir)
    model = LoadedModel(pipe=tiny_sd15, family="SD1", source="tiny", name="tiny", hash="0" * 10)
    out = export_checkpoint(model, tmp_path / "tiny.safetensors")
    _, shapes = header(out)
    for name in ("model.diffusion_model.input_blocks.3.0.op.weight",  # the first downsampler
                 "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                 "model.diffusion_model.middle_block.2.out_layers.3.weight",
                 "model.diffusion_model.output_blocks.2.1.conv.weight",  # upsampler of the attention-free level
                 "model.diffusion_model.output_blocks.5.2.conv.weight",  # upsampler after a ResBlock + attention
                 "model.diffusion_model.time_embed.2.weight", "model.diffusion_model.out.2.weight",
                 "first_stage_model.decoder.up.3.upsample.conv.weight", "first_stage_model.encoder.norm_out.weight",
                 "first_stage_model.encoder.down.0.block.1.conv1.weight",
                 "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert name in shapes, name
    assert len(shapes["first_stage_model.encoder.mid.attn_1.q.weight"]) == 4  # LDM's 1x1 convolution

    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(config_dir), local_files_only=True)
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(tiny_sd15, component).state_dict(), getattr(loaded, component).state_dict()
        assert all(torch.equal(t, theirs[k]) for k, t in ours.items() if not k.endswith("position_ids")), component


def test_refusals_come_before_any_work(embedded, lora_file, tmp_path):
    existing = tmp_path / "there.safetensors"
    existing.write_bytes(b"keep")
    with pytest.raises(StudioError, match="exists: pass overwrite=True"):
        export_checkpoint(embedded, existing, adapters=[(lora_file, 0.8)])
    assert existing.read_bytes() == b"keep"
    with pytest.raises(StudioError, match="written as .safetensors"):
        export_checkpoint(embedded, tmp_path / "model.ckpt")

    other_base = save_adapter(LoRA.from_unet(build_unet("tiny-sd15"), LoRAConfig(rank=2)),
                              tmp_path / "other.safetensors")
    with pytest.raises(StudioError, match="adapters\\[0\\]"):
        export_checkpoint(embedded, tmp_path / "a.safetensors", adapters=[(other_base, 1.0)])
    tuner = save_adapter(SCTuner.from_unet(embedded.pipe.unet), tmp_path / "tuner.safetensors")
    with pytest.raises(StudioError, match="changes activations, not weights"):
        export_checkpoint(embedded, tmp_path / "a.safetensors", adapters=[(tuner, 1.0)])
    assert not (tmp_path / "a.safetensors").exists() and not list(tmp_path.glob(".a.safetensors.*"))

    sd2 = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1024,
                                                                      addition_embed_type=None)))
    with pytest.raises(StudioError, match="SD 2.x model .* OpenCLIP"):
        check_family(sd2)


def test_cli_exports_and_refuses_an_existing_file_in_one_line(lora_file, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    args = ["checkpoint", "export", "--adapter", f"{lora_file}:0.8", "--out", str(out), "--library",
            str(tmp_path / "library")]
    assert cli_main(args) == 0 and out.exists()
    assert json.loads(header(out)[0]["studio.merged_adapters"])[0]["scale"] == 0.8
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out=") and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_a_kohya_file_with_a_text_encoder_part_is_merged_into_both(tiny_sd15, tmp_path):
    """A LoRA file of another tool (diffusers' own kohya converter, UNet + text encoder) merged at 0.8 gives the
    images of the same file attached at 0.8 through generate(adapters=...)."""
    spec = importlib.util.spec_from_file_location("bench_interop", Path(__file__).parents[1] / "bench" / "interop.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    kohya = bench.diffusers_kohya_file(tmp_path / "d.safetensors", rank=4)
    assert any(k.startswith("lora_te") for k in header(kohya)[1])  # the text encoder part is really there

    config_dir = tmp_path / "config"
    tiny_sd15.save_pretrained(config_dir)
    model = LoadedModel(pipe=tiny_sd15, family="SD1", source="tiny", name="tiny", hash="0" * 10)
    kwargs = dict(num_inference_steps=2, seed=3, guidance_scale=5.0)
    plain = generate(tiny_sd15, "a red star", **kwargs).images[0]
    reference = generate(tiny_sd15, "a red star", adapters=[(kohya, 0.8)], **kwargs).images[0]
    out = export_checkpoint(model, tmp_path / "merged.safetensors", adapters=[(kohya, 0.8)])
    assert f'Lora hashes: "d: {file_hash([kohya])}"' in header(out)[0]["parameters"]

    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(config_dir), local_files_only=True)
    changed = [k for k, t in tiny_sd15.text_encoder.state_dict().items()
               if not k.endswith("position_ids") and not torch.equal(t, loaded.text_encoder.state_dict()[k])]
    assert changed  # the text encoder's deltas are in the file, not only the UNet's
    image = generate(loaded, "a red star", **kwargs).images[0]
    assert np.abs(pixels(image) - pixels(reference)).max() <= 1 / 255
    assert np.abs(pixels(image) - pixels(plain)).max() > 2 / 255  # the LoRA does change the image
