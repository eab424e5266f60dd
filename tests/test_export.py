"""Checkpoints out (pipelines/export.py, `studio checkpoint export`): base + merged adapters as one single-file
`.safetensors` in the original SD layout (SD 1.x, SD 2.x, SDXL), read back by diffusers' single-file loader and by
`load_model`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from adapter_helpers import perturb
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from adapters import LoRA, LoRAConfig, SCTuner, save_adapter
from adapters.foreign import link_pipeline
from adapters.kohya import adaptable_modules, ldm_path
from pipelines import EMBEDDED_MODEL, generate, load_model
from pipelines.architectures import build_unet, tiny_sdxl_pipeline, unet_inputs
from pipelines.attach import attached
from pipelines.errors import StudioError
from pipelines.export import SD2_TEXT_PREFIX, check_family, export_checkpoint, openclip_layout, text_encoder_state
from pipelines.loading import LoadedModel, lora_hash
from studio.cli import main as cli_main

TOKENIZER = str(EMBEDDED_MODEL / "tokenizer")
# diffusers' single-file loader tells SDXL's encoders apart by width (CLIP-L 768, bigG 1280): the tiny SDXL's
# default widths are equal, so these tests give them different ones (bigG's projection 40 -> 32 is not square,
# which also shows the transposition).
SDXL_WIDTHS = (24, 40)


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
    assert f'Lora hashes: "sks: {lora_hash(lora_file)}"' in meta["parameters"]
    merged = json.loads(meta["studio.merged_adapters"])
    assert merged == [{"name": "sks", "hash": lora_hash(lora_file), "scale": 0.8, "method": "lora"}]

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

    # What is still refused: a pipeline without the text encoders its family's layout holds (an SDXL refiner).
    refiner = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=1280,
                                                                          addition_embed_type="text_time")),
                              text_encoder=None, text_encoder_2=object())
    with pytest.raises(StudioError, match="SDXL pipeline has no text_encoder.*refiner"):
        check_family(refiner)


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
    assert f'Lora hashes: "d: {lora_hash(kohya)}"' in header(out)[0]["parameters"]

    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(config_dir), local_files_only=True)
    changed = [k for k, t in tiny_sd15.text_encoder.state_dict().items()
               if not k.endswith("position_ids") and not torch.equal(t, loaded.text_encoder.state_dict()[k])]
    assert changed  # the text encoder's deltas are in the file, not only the UNet's
    image = generate(loaded, "a red star", **kwargs).images[0]
    assert np.abs(pixels(image) - pixels(reference)).max() <= 1 / 255
    assert np.abs(pixels(image) - pixels(plain)).max() > 2 / 255  # the LoRA does change the image


# --- SD 2.x and SDXL ------------------------------------------------------------------------------------------------
FAMILIES = {  # family -> (pipeline builder, pipeline class, names only that family's layout has)
    "SD2": (None, StableDiffusionPipeline,
            {"cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight": (3 * 1024, 1024),
             "cond_stage_model.model.positional_embedding": (32, 1024),  # the Shapes tokenizer: 32 positions
             "cond_stage_model.model.text_projection": (1024, 1024),
             "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32)}),  # linear: 2-D
    "SDXL": (lambda: tiny_sdxl_pipeline(TOKENIZER, text_widths=SDXL_WIDTHS), StableDiffusionXLPipeline,
             {"model.diffusion_model.label_emb.0.0.weight": (128, 80),  # pooled text + size ids -> time width
              "model.diffusion_model.label_emb.0.2.weight": (128, 128),
              "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight": (24, 24),
              "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight": (3 * 40, 40),
              "conditioner.embedders.1.model.text_projection": (40, 32)}),  # OpenCLIP's x @ P: (width, proj)
}
PREFIXES = {"SD2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
            "SDXL": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                     "conditioner.embedders.1.model.")}


@pytest.fixture(params=sorted(FAMILIES))
def tiny(request) -> tuple[str, LoadedModel]:
    family = request.param
    build = FAMILIES[family][0]
    pipe = request.getfixturevalue("tiny_sd2") if build is None else build()
    return family, LoadedModel(pipe=pipe, family=family, source="tiny", name="tiny", hash="0" * 10)


def config_folder(pipe, folder: Path) -> Path:
    """The local diffusers folder that single-file loading reads its configs from (saved from the pipeline)."""
    pipe.save_pretrained(folder)
    return folder


def encoders(pipe) -> list[torch.nn.Module]:
    return [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]


@torch.no_grad()
def text_outputs(pipe, prompt: str = "a red circle") -> list[torch.Tensor]:
    """Each text encoder's penultimate hidden states (what SD 2 / SDXL condition on) and first output (last hidden
    state; bigG's projected pooled embedding)."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    outs = []
    for encoder in encoders(pipe):
        out = encoder(ids, output_hidden_states=True)
        outs += [out.hidden_states[-2], out[0]]
    return outs


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": t.clone() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None for k, t in getattr(pipe, name).state_dict().items()}


def reloaded(family: str, out: Path, config: Path) -> list:
    """The exported file read back by this studio's loader and by diffusers' own single-file loader."""
    studio = load_model(out, device="cpu", dtype=torch.float32, config=config)
    assert studio.family == family
    theirs = FAMILIES[family][1].from_single_file(str(out), config=str(config), local_files_only=True)
    return [studio.pipe, theirs]


def test_sd2_and_sdxl_export_with_a_lora_at_0_8_reloads_both_ways_as_the_attached_lora(tiny, tmp_path):
    family, model = tiny
    pipe = model.pipe
    config = config_folder(pipe, tmp_path / "config")
    lora = LoRA.from_unet(pipe.unet, LoRAConfig(rank=4))
    perturb(lora, seed=1)
    lora_file = save_adapter(lora, tmp_path / "sks.safetensors")
    before = weights(pipe)

    out = export_checkpoint(model, tmp_path / f"{family}.safetensors", adapters=[(lora_file, 0.8)])

    after = weights(pipe)  # the model itself is untouched, bit for bit (UNet, VAE, text encoders)
    assert after.keys() == before.keys() and all(torch.equal(before[k], t) for k, t in after.items())
    meta, shapes = header(out)
    assert all(k.startswith(PREFIXES[family]) for k in shapes)
    for name, shape in FAMILIES[family][2].items():
        assert shapes[name] == shape, name
    assert meta["modelspec.architecture"] == {"SD2": "stable-diffusion-v2-768-v",
                                              "SDXL": "stable-diffusion-xl-v1-base"}[family]
    assert json.loads(meta["studio.merged_adapters"])[0]["scale"] == 0.8

    inputs = unet_inputs(pipe.unet)
    with attached(pipe.unet, [(lora_file, 0.8)]), torch.no_grad():
        reference = pipe.unet(**inputs).sample
    reference_text = text_outputs(pipe)
    with torch.no_grad():
        plain = pipe.unet(**inputs).sample
    assert (reference - plain).abs().max() > 1e-3  # the LoRA does change the output
    for loaded in reloaded(family, out, config):
        with torch.no_grad():
            assert (loaded.unet(**inputs).sample - reference).abs().max() <= 1e-4
        for ours, theirs in zip(reference_text, text_outputs(loaded), strict=True):
            assert (ours - theirs).abs().max() <= 1e-4


def kohya_file(pipe, path: Path, family: str, seed: int = 0) -> Path:
    """A kohya LoRA as sd-scripts writes one for `family`: UNet attention (LDM names, as kohya trains on the original
    UNet) and each text encoder's attention q/k/v/out and MLP (`lora_te_`; SDXL `lora_te1_` and `lora_te2_`)."""
    g = torch.Generator().manual_seed(seed)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if family == "SDXL" else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, prefix in prefixes.items():
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module_path, layer in adaptable_modules(model).items():
            if component == "unet":
                if ".transformer_blocks.0.attn" not in module_path:
                    continue
                module_path = ldm_path(module_path, model.config)
            elif not module_path.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.out_proj", "mlp.fc1")):
                continue
            elif not module_path.startswith("text_model."):  # transformers 4's names, which kohya files have
                module_path = "text_model." + module_path
            name = prefix + module_path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=g) * 0.3
            tensors[f"{name}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=g) * 0.3
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


def test_a_kohya_file_s_text_encoder_parts_are_merged_into_each_encoder(tiny, tmp_path):
    """SD 2.x: `lora_te_` into the OpenCLIP tower (its q/k/v deltas land in the fused in_proj); SDXL: `lora_te1_`
    into CLIP-L and `lora_te2_` into bigG. The reloaded model computes what the file attached at 0.8 computes."""
    family, model = tiny
    pipe = model.pipe
    config = config_folder(pipe, tmp_path / "config")
    kohya = kohya_file(pipe, tmp_path / "k.safetensors", family)
    before = weights(pipe)
    plain_text = text_outputs(pipe)

    out = export_checkpoint(model, tmp_path / "merged.safetensors", adapters=[(kohya, 0.8)])

    after = weights(pipe)
    assert all(torch.equal(before[k], t) for k, t in after.items())
    link_pipeline(pipe)  # the attached file hooks the text encoders too
    inputs = unet_inputs(pipe.unet)
    with attached(pipe.unet, [(kohya, 0.8)]), torch.no_grad():
        reference, reference_text = pipe.unet(**inputs).sample, text_outputs(pipe)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(reference_text, plain_text))  # every encoder is adapted
    for loaded in reloaded(family, out, config):
        with torch.no_grad():
            assert (loaded.unet(**inputs).sample - reference).abs().max() <= 1e-4
        for ours, theirs in zip(reference_text, text_outputs(loaded), strict=True):
            assert (ours - theirs).abs().max() <= 1e-4


def test_a_23_block_sd2_text_encoder_gets_openclip_h_s_24th_block_as_an_identity():
    """diffusers' SD 2 text encoder is OpenCLIP-H cut to its 23 blocks (SD 2 reads the penultimate block); the file
    holds 24 as original SD 2 checkpoints do. diffusers' converter gives back the 23 exactly, and a reader that runs
    all 24 blocks computes the same features."""
    config = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act="gelu",
                  max_position_embeddings=77)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(**config, num_hidden_layers=23))
    state = openclip_layout(text_encoder_state(encoder), SD2_TEXT_PREFIX, pad_to=24)
    blocks = {k.split(".")[4] for k in state if ".resblocks." in k}
    assert blocks == {str(i) for i in range(24)}
    assert torch.equal(state[SD2_TEXT_PREFIX + "text_projection"], torch.eye(32))

    back = convert_open_clip_checkpoint(encoder, state)  # what from_single_file does with an SD 2 file
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    ours = {k: v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
    assert back.keys() == ours.keys() and all(torch.equal(v, back[k]) for k, v in ours.items())

    full = CLIPTextModel(CLIPTextConfig(**config, num_hidden_layers=24))  # OpenCLIP-H's whole tower
    # Under another prefix the converter skips nothing, so it reads all 24 blocks (and the projection, unused here).
    renamed = {k.replace(SD2_TEXT_PREFIX, "all."): v for k, v in state.items()}
    every = convert_open_clip_checkpoint(full, renamed, prefix="all.")
    every.pop("text_projection.weight")
    missing, unexpected = full.load_state_dict({k.removeprefix("text_model."): v for k, v in every.items()},
                                               strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    ids = torch.randint(0, 99, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(full(ids).last_hidden_state, encoder(ids).last_hidden_state)


def test_lora_hash_is_a1111_s_addnet_hash_of_the_tensor_bytes(tmp_path):
    """A1111 looks LoRAs up by the first 12 hex digits of the SHA-256 of the bytes after the safetensors header
    (its network.py `set_hash`, `use_addnet_hash`), or by kohya's recorded `sshs_model_hash`."""
    import hashlib

    from safetensors.torch import save_file

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(6.0).view(2, 3)}
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, first, metadata={"ss_output_name": "a"})
    save_file(tensors, second, metadata={"ss_output_name": "a much longer name that moves the tensor bytes"})
    data = first.read_bytes()
    payload = data[8 + int.from_bytes(data[:8], "little"):]
    assert lora_hash(first) == hashlib.sha256(payload).hexdigest()[:12]
    assert lora_hash(second) == lora_hash(first)  # the metadata is not hashed
    assert lora_hash(first) != hashlib.sha256(data).hexdigest()[:12]  # nor the whole file
    recorded = tmp_path / "c.safetensors"
    save_file(tensors, recorded, metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    assert lora_hash(recorded) == "0123456789ab"
