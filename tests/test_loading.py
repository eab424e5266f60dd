"""load_model: every source kind, and every refusal with a message that names the fix."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from pipelines import EMBEDDED_MODEL, LoadedModel, ModelLoadError, load_model
from pipelines.single_file import CONFIGS, checkpoint_family, write_config


def test_embedded_model_loads_with_its_family(embedded: LoadedModel):
    assert embedded.source == "embedded"
    assert embedded.name == "shapes-sd"
    assert embedded.family == "SD1"
    assert re.fullmatch(r"[0-9a-f]{10}", embedded.hash)
    assert embedded.device.type == "cpu" and embedded.dtype == torch.float32


def test_folder_loads_with_requested_dtype(tiny_sd15, tmp_path):
    tiny_sd15.save_pretrained(tmp_path / "tiny")
    model = load_model(tmp_path / "tiny", device="cpu", dtype="bf16")
    assert model.name == "tiny" and model.family == "SD1"
    assert model.dtype == torch.bfloat16
    assert type(model.pipe).__name__ == "StableDiffusionPipeline"


# --- single-file checkpoints ---------------------------------------------------------------
# The inverse of diffusers' original-SD -> diffusers conversion, for SD 1.x layouts: it writes the
# tiny pipeline as an original-format checkpoint, so the test checks load_model against
# diffusers' own converter (every tensor must come back unchanged).

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_unet_key(key: str, config) -> str:
    n = config.layers_per_block  # down blocks hold n layers + a downsampler, up blocks n + 1 layers
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.([^.]+)(.*)", key):
        side, block, kind, layer, head, rest = m.groups()
        index = (n + 1) * int(block) + int(layer) + (1 if side == "down" else 0)
        head = RESNET[head] if kind == "resnets" else head
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}.{head}{rest}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.([^.]+)(.*)", key):
        kind, layer, head, rest = m.groups()
        return f"middle_block.{2 * int(layer) if kind == 'resnets' else 1}.{RESNET.get(head, head)}{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", key):
        return f"input_blocks.{(n + 1) * (int(m[1]) + 1)}.0.op{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0(.*)", key):
        has_attention = config.up_block_types[int(m[1])].startswith("CrossAttn")
        return f"output_blocks.{(n + 1) * int(m[1]) + n}.{2 if has_attention else 1}{m[2]}"
    head, rest = key.rsplit(".", 1)
    return f"{top[head]}.{rest}"


def _ldm_vae_item(key: str, value: torch.Tensor, n_blocks: int) -> tuple[str, torch.Tensor]:
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        side, kind, block, layer, rest = m.groups()
        block = int(block) if kind == "down" else n_blocks - 1 - int(block)  # LDM numbers up blocks bottom-up
        return f"{side}.{kind}.{block}.block.{layer}.{rest.replace('conv_shortcut', 'nin_shortcut')}", value
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.(.*)", key):
        side, kind, block, sampler, rest = m.groups()
        block = int(block) if kind == "down" else n_blocks - 1 - int(block)
        return f"{side}.{kind}.{block}.{sampler}sample.{rest}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        name = VAE_ATTENTION[m[2]]
        if name != "norm" and m[3] == "weight":
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        return f"{m[1]}.mid.attn_1.{name}.{m[3]}", value
    return key.replace("conv_norm_out", "norm_out"), value


def to_ldm_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """An SD 1.x pipeline's weights under the original Stable Diffusion (LDM) names."""
    out = {"model.diffusion_model." + _ldm_unet_key(k, pipe.unet.config): v for k, v in pipe.unet.state_dict().items()}
    n_blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        key, value = _ldm_vae_item(key, value, n_blocks)
        out["first_stage_model." + key] = value
    # transformers 5 drops CLIPTextModel's "text_model." prefix from its state dict; checkpoints keep it.
    out |= {"cond_stage_model.transformer.text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()}
    return {k: v.contiguous() for k, v in out.items()}


def test_single_file_round_trip(tiny_sd15, tmp_path):
    tiny_sd15.save_pretrained(tmp_path / "config")
    checkpoint = tmp_path / "tiny-sd.safetensors"
    save_file(to_ldm_checkpoint(tiny_sd15), checkpoint)

    model = load_model(checkpoint, device="cpu", config=tmp_path / "config")

    assert model.name == "tiny-sd" and model.family == "SD1"
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(tiny_sd15, name).state_dict()
        loaded = getattr(model.pipe, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), f"{name}.{key}"


def test_single_file_of_unknown_width_needs_a_config(tiny_sd15, tmp_path):
    checkpoint = tmp_path / "tiny-sd.safetensors"
    save_file(to_ldm_checkpoint(tiny_sd15), checkpoint)
    with pytest.raises(ModelLoadError, match="config="):
        load_model(checkpoint, device="cpu")


@pytest.mark.parametrize(("width", "family"), [(768, "SD1"), (1024, "SD2"), (2048, "SDXL"), (32, None)])
def test_family_from_cross_attention_width(tmp_path, width, family):
    shapes = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, width)}
    assert checkpoint_family(tmp_path / "x.safetensors", shapes) == family


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_builtin_single_file_configs_are_complete(tmp_path, family):
    """The local configs that replace the hub's: loadable, and matching the family they claim."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    write_config(family, tmp_path)
    unet = UNet2DConditionModel.load_config(tmp_path / "unet")
    assert {768: "SD1", 1024: "SD2"}[unet["cross_attention_dim"]] == family
    assert CLIPTextConfig.from_pretrained(tmp_path / "text_encoder").hidden_size == unet["cross_attention_dim"]
    assert AutoencoderKL.load_config(tmp_path / "vae")["latent_channels"] == 4
    DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids


# --- refusals ------------------------------------------------------------------------------


def test_unknown_path_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(tmp_path / "missing" / "model.safetensors")


def test_hub_id_offline_fails_fast_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="offline.*download it on a machine with access"):
        load_model("studio-tests/no-such-model")


def test_text_file_renamed_safetensors_is_refused(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="not a valid safetensors file"):
        load_model(fake)


def test_safetensors_without_a_unet_is_refused(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(ModelLoadError, match="no Stable Diffusion UNet"):
        load_model(lora)


def test_other_files_are_refused(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model"):
        load_model(notes)


def test_pickles_are_refused_unless_allowed(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x.attn2.to_k.weight": torch.zeros(2, 32)}}, ckpt)
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        load_model(ckpt)
    # Allowed, it is read (with torch's restricted unpickler) and then judged on its contents.
    with pytest.raises(ModelLoadError, match="config="):
        load_model(ckpt, allow_pickle=True)


@pytest.mark.parametrize(("kwargs", "message"), [({"device": "tpu9"}, "not a torch device"),
                                                 ({"dtype": "int8"}, "dtype 'int8' is not supported")])
def test_bad_device_or_dtype_is_refused(kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(**kwargs)


def test_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_model(tmp_path)


def test_folder_missing_a_component_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text((EMBEDDED_MODEL / "model_index.json").read_text())
    with pytest.raises(ModelLoadError, match="lacks the component folder"):
        load_model(tmp_path)
