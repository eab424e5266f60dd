"""Bad input on every surface (issue 20's sweep, kept as tables): the Python API raises a StudioError, the CLI
exits non-zero with one `error: ...` line and no traceback, the app's HTTP API raises with the reason; and each
message names the field or the file at fault.

Every case is refused before any real work, or after at most one denoising step of a tiny model, so the file
runs in well under two minutes on a CPU.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from gradio_client import Client
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters import SCTuner, save_adapter
from pipelines import (
    EMBEDDED_MODEL,
    InputError,
    ModelLoadError,
    NonFiniteError,
    StudioError,
    edit,
    generate,
    load_model,
)
from pipelines.compose import ComposeRegion, ComposerSettings, compose
from pipelines.datasets import DatasetError, load_masks, scan_folder
from pipelines.train import TrainConfig, TrainConfigError
from studio.cli import main
from studio.jobs.manifest import ManifestError, read_manifest
from tests.test_ui import app_url  # noqa: F401  (the app on a free port, shared by this module)

NAN, INF = math.nan, math.inf


# --- the bad files, made once ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(embedded, tmp_path_factory) -> dict[str, Path]:
    """Named bad (and a few good) files: adapters, models, datasets, configs, images."""
    root = tmp_path_factory.mktemp("bad-inputs")
    f: dict[str, Path] = {}

    # Adapters: a good SC-Tuner, then the same file with NaN weights, a tensor missing, a tensor of the wrong shape.
    tuner = SCTuner.from_unet(embedded.pipe.unet)
    f["adapter"] = save_adapter(tuner, root / "good.safetensors")
    with safe_open(str(f["adapter"]), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(f["adapter"]))
    first = sorted(tensors)[0]
    for name, changed in (("nan", {**tensors, first: torch.full_like(tensors[first], NAN)}),
                          ("missing", {k: v for k, v in tensors.items() if k != first}),
                          ("shape", {**tensors, first: torch.zeros(tensors[first].numel() + 1)})):
        f[f"adapter_{name}"] = root / f"adapter-{name}.safetensors"
        save_file(changed, str(f[f"adapter_{name}"]), metadata=header)
    f["not_adapter"] = root / "notes.safetensors"
    f["not_adapter"].write_text("not a safetensors file")

    # Models: the embedded one with a cut UNet file, and with a UNet config.json that does not match its weights.
    for name in ("truncated", "mismatched"):
        folder = root / f"model-{name}"
        folder.mkdir()
        for part in EMBEDDED_MODEL.iterdir():
            (folder / part.name).symlink_to(part) if part.name != "unet" else shutil.copytree(part, folder / "unet")
        f[f"model_{name}"] = folder
    weights = f["model_truncated"] / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config_file = f["model_mismatched"] / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    config_file.write_text(json.dumps(config))

    # Training data: one image whose caption is not UTF-8 (Windows-1252 "café").
    data = root / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    (data / "a.txt").write_bytes("a red caf\xe9".encode("cp1252"))
    f["data_latin1"] = data
    good = root / "good-data"
    good.mkdir()
    Image.new("RGB", (64, 64), "red").save(good / "a.png")
    f["data"] = good

    # Configs and manifests.
    f["yaml_broken"] = root / "broken.yaml"
    f["yaml_broken"].write_text("steps: [1, 2\nmethod: lora\n")
    f["yaml_latin1"] = root / "latin1.yaml"
    f["yaml_latin1"].write_bytes("trigger: caf\xe9\n".encode("cp1252"))
    f["toml_broken"] = root / "broken.toml"
    f["toml_broken"].write_text("steps = \n")
    f["manifest_broken"] = root / "batch.yaml"
    f["manifest_broken"].write_text("subjects:\n  - data_dir: [x\n")

    # Images and plain files.
    f["image"] = root / "in.png"
    Image.new("RGB", (64, 64), "gray").save(f["image"])
    f["corrupt_png"] = root / "corrupt.png"
    f["corrupt_png"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    f["a_file"] = root / "a-file.txt"
    f["a_file"].write_text("a file where a folder is expected")
    return f


# --- 1. The Python API ----------------------------------------------------------------------------------------

def _generate(**kwargs):
    return lambda model, f: generate(model, "a red circle", **{"num_inference_steps": 1, "seed": 0, **kwargs})


def _edit(**kwargs):
    def run(model, f):
        values = {"num_inference_steps": 1, "image": f["image"], **kwargs}
        image = values.pop("image")
        return edit(model, f[image] if isinstance(image, str) else image, "a circle", "a square", **values)
    return run


def _compose(**kwargs):
    def run(model, f):
        values = {"adapters": [(f["adapter"], 1.0)], "regions": [ComposeRegion((0, 0, 64, 64), "a sks")],
                  "num_inference_steps": 1, **kwargs}
        return compose(model, "a sks", **values)
    return run


def _adapter(file_key: str, scale: float = 1.0):
    return lambda model, f: generate(model, "a", num_inference_steps=1, seed=0, adapters=[(f[file_key], scale)])


def _load(source):
    return lambda model, f: load_model(f[source] if source in f else source, device="cpu")


def _train(**kwargs):
    return lambda model, f: TrainConfig(**{"data_dir": f["data"], "output_dir": f["image"].parent / "run", **kwargs})


API_CASES = [
    # generate: sizes, steps, guidance, counts, sampler, seeds, prompts
    ("width negative", _generate(width=-64), InputError, "width=-64"),
    ("width not a multiple of 8", _generate(width=62), InputError, "width=62"),
    ("height too large", _generate(height=4096), InputError, "height=4096"),
    ("steps 0", _generate(num_inference_steps=0), InputError, "num_inference_steps=0"),
    ("steps a million", _generate(num_inference_steps=1_000_000), InputError, "num_inference_steps=1000000"),
    ("steps 1001 (DDIM's limit)", _generate(num_inference_steps=1001), InputError, "num_inference_steps=1001"),
    ("steps a float", _generate(num_inference_steps=2.5), InputError, "num_inference_steps=2.5"),
    ("steps a bool", _generate(num_inference_steps=True), InputError, "num_inference_steps=True"),
    ("guidance inf", _generate(guidance_scale=INF), InputError, "guidance_scale=inf"),
    ("guidance nan", _generate(guidance_scale=NAN), InputError, "guidance_scale=nan"),
    ("guidance 1e30", _generate(guidance_scale=1e30), InputError, "guidance_scale=1e+30"),
    ("guidance negative", _generate(guidance_scale=-1.0), InputError, "guidance_scale=-1.0"),
    ("no images", _generate(num_images_per_prompt=0), InputError, "num_images_per_prompt=0"),
    ("too many images", _generate(num_images_per_prompt=100), InputError, "num_images_per_prompt=100"),
    ("unknown scheduler", _generate(scheduler="PLMS"), InputError, "scheduler='PLMS'"),
    ("seed negative", _generate(seed=-1), InputError, "seed=-1"),
    ("seed past 2**32-1", _generate(seed=2**32), InputError, "seed=4294967296"),
    ("seed a string", _generate(seed="7"), InputError, "seed='7'"),
    ("seed and generator", _generate(generator=torch.Generator()), InputError, "seed or generator"),
    ("prompt not a string", lambda m, f: generate(m, None, num_inference_steps=1), InputError, "prompt"),
    ("adapters_on_uncond a string", _generate(adapters_on_uncond="no"), InputError, "adapters_on_uncond='no'"),
    # generate: adapters
    ("adapter file missing", lambda m, f: generate(m, "a", num_inference_steps=1,
                                                   adapters=[(f["image"].parent / "nope.safetensors", 1.0)]),
     InputError, "nope.safetensors"),
    ("adapter with NaN weights", _adapter("adapter_nan"), InputError, "adapter-nan.safetensors has NaN/inf weights"),
    ("adapter tensor missing", _adapter("adapter_missing"), InputError, "adapter-missing.safetensors"),
    ("adapter tensor of the wrong shape", _adapter("adapter_shape"), InputError, "adapter-shape.safetensors"),
    ("adapter not a safetensors file", _adapter("not_adapter"), InputError, "notes.safetensors"),
    ("adapter scale nan", _adapter("adapter", NAN), InputError, "scale=nan"),
    ("adapter scale inf", _adapter("adapter", INF), InputError, "scale=inf"),
    ("adapters not a list", lambda m, f: generate(m, "a", num_inference_steps=1, adapters=str(f["adapter"])),
     InputError, "adapters must be a list"),
    # edit
    ("edit steps 0", _edit(num_inference_steps=0), InputError, "num_inference_steps=0"),
    ("edit steps 5000", _edit(num_inference_steps=5000), InputError, "num_inference_steps=5000"),
    ("edit guidance inf", _edit(guidance_scale=INF), InputError, "guidance_scale=inf"),
    ("edit quantile 1.5", _edit(quantile=1.5), InputError, "quantile=1.5"),
    ("edit quantile nan", _edit(quantile=NAN), InputError, "quantile=nan"),
    ("edit mask floor negative", _edit(mask_floor=-0.1), InputError, "mask_floor=-0.1"),
    ("edit mask start inf", _edit(mask_start_t=INF), InputError, "mask_start_t=inf"),
    ("edit dilation negative", _edit(dilation=-1), InputError, "dilation=-1"),
    ("edit threshold mode", _edit(threshold_mode="bogus"), InputError, "threshold_mode='bogus'"),
    ("edit image missing", _edit(image=Path("/nonexistent/photo.png")), StudioError, "photo.png"),
    ("edit image corrupt", _edit(image="corrupt_png"), StudioError, "corrupt.png"),
    ("edit mask missing", _edit(user_mask=Path("/nonexistent/mask.png")), StudioError, "mask.png"),
    # compose
    ("compose mode", _compose(mode="sum"), InputError, "mode='sum'"),
    ("compose no adapters", _compose(adapters=[]), InputError, "adapters is empty"),
    ("compose steps 2000", _compose(num_inference_steps=2000), InputError, "num_inference_steps=2000"),
    ("compose guidance inf", _compose(guidance_scale=INF), InputError, "guidance_scale=inf"),
    ("compose box outside", _compose(regions=[ComposeRegion((0, 0, 640, 64), "a sks")]), InputError,
     "regions[0].box"),
    ("compose weight nan", lambda m, f: _compose(adapters=[(f["adapter"], NAN)])(m, f), InputError, "scale=nan"),
    ("compose step nan", lambda m, f: ComposerSettings(step_size=NAN), InputError, "step_size=nan"),
    ("compose early stop -1", lambda m, f: ComposerSettings(min_refine_steps=-1), InputError, "min_refine_steps=-1"),
    # load_model
    ("model empty string", _load(""), ModelLoadError, "model '' is empty"),
    ("model path missing", _load("./no-such-model-folder"), ModelLoadError, "no-such-model-folder"),
    ("model UNet weights cut short", _load("model_truncated"), ModelLoadError, "diffusion_pytorch_model.safetensors"),
    ("model UNet config mismatched", _load("model_mismatched"), ModelLoadError, "model-mismatched"),
    ("model a text file", _load("a_file"), ModelLoadError, "a-file.txt"),
    ("model dtype", lambda m, f: load_model(dtype="float8", device="cpu"), ModelLoadError, "dtype 'float8'"),
    # training settings, data and config files
    ("train steps 0", _train(steps=0), TrainConfigError, "steps=0"),
    ("train instance prompt share a string", _train(trigger="sks", instance_prompt_share="half"), TrainConfigError,
     "instance_prompt_share='half'"),
    ("train steps ten million", _train(steps=10_000_000), TrainConfigError, "steps=10000000"),
    ("train learning rate nan", _train(learning_rate=NAN), TrainConfigError, "learning_rate=nan"),
    ("train learning rate inf", _train(learning_rate=INF), TrainConfigError, "learning_rate=inf"),
    ("train guidance inf", _train(guidance_scale=INF), TrainConfigError, "guidance_scale=inf"),
    ("train sample steps 5000", _train(sample_steps=5000), TrainConfigError, "sample_steps=5000"),
    ("train output_dir a file", lambda m, f: TrainConfig(data_dir=f["data"], output_dir=f["a_file"]),
     TrainConfigError, "output_dir"),
    ("train data_dir missing", _train(data_dir=Path("/nonexistent/data")), TrainConfigError, "data_dir"),
    ("train method unknown", _train(method="dreambooth-xl"), TrainConfigError, "method='dreambooth-xl'"),
    ("train config YAML broken", lambda m, f: TrainConfig.from_file(f["yaml_broken"]), TrainConfigError,
     "broken.yaml is not valid YAML"),
    ("train config not UTF-8", lambda m, f: TrainConfig.from_file(f["yaml_latin1"]), TrainConfigError,
     "latin1.yaml is not UTF-8"),
    ("train config TOML broken", lambda m, f: TrainConfig.from_file(f["toml_broken"]), TrainConfigError,
     "broken.toml is not valid TOML"),
    ("caption not UTF-8", lambda m, f: scan_folder(f["data_latin1"]), DatasetError, "a.txt is not UTF-8"),
    ("masked loss on an image without transparency",
     lambda m, f: load_masks(scan_folder(f["data"], fallback_caption="x"), 64), DatasetError, "good-data/a.png"),
    ("jobs manifest YAML broken", lambda m, f: read_manifest(f["manifest_broken"]), ManifestError, "batch.yaml"),
]


@pytest.mark.parametrize(("call", "error", "names"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_the_api_refuses_with_a_studio_error_naming_the_field(embedded, files, call, error, names):
    assert issubclass(error, StudioError)
    with pytest.raises(error) as refused:
        call(embedded, files)
    assert names in str(refused.value)
    assert "\n" not in str(refused.value).strip() or error is ManifestError  # one line (a manifest lists problems)


def test_steps_beyond_the_models_scheduler_are_refused_naming_its_limit(embedded):
    pipe = embedded.pipe
    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(original.config, num_train_timesteps=100)
    try:
        with pytest.raises(InputError, match=r"num_inference_steps=200 .* at most 100 \(the model's scheduler"):
            generate(embedded, "a", num_inference_steps=200, seed=0)
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_nan_weights_stop_generation_with_the_likely_cause_instead_of_a_black_image(tiny_sd15, part):
    module = tiny_sd15.unet.conv_out if part == "unet" else tiny_sd15.vae.decoder.conv_out
    with torch.no_grad():
        module.weight.fill_(NAN)
    with pytest.raises(NonFiniteError) as stopped:
        generate(tiny_sd15, "a", num_inference_steps=1, seed=0)
    message = str(stopped.value)
    assert ("the latents" if part == "unet" else "the decoded images") in message
    assert "model's weights" in message and "black" in message


# --- 2. The CLI -----------------------------------------------------------------------------------------------

def _cli(*argv: str):
    return lambda f, tmp: [a.format(**f, tmp=tmp) for a in argv]


GEN = ("generate", "a red circle", "--steps", "1", "--out", "{tmp}/out")
EDIT = ("edit", "{image}", "--source", "a circle", "--target", "a square", "--steps", "1", "--out", "{tmp}/out")
TRAIN = ("train", "--data", "{data}", "--steps", "1", "--no-library", "--out", "{tmp}/run")

CLI_CASES = [
    ("steps a million", _cli(*GEN, "--steps", "1000000"), "num_inference_steps=1000000"),
    ("steps 0", _cli(*GEN, "--steps", "0"), "num_inference_steps=0"),
    ("steps not a number", _cli(*GEN, "--steps", "many"), "--steps"),
    ("guidance inf", _cli(*GEN, "--guidance", "inf"), "guidance_scale=inf"),
    ("guidance nan", _cli(*GEN, "--guidance", "nan"), "guidance_scale=nan"),
    ("guidance 1e30", _cli(*GEN, "--guidance", "1e30"), "guidance_scale=1e+30"),
    ("seed 2**32", _cli(*GEN, "--seed", "4294967296"), "seed=4294967296"),
    ("seed negative", _cli(*GEN, "--seed", "-1"), "seed=-1"),
    ("width 60", _cli(*GEN, "--width", "60"), "width=60"),
    ("n 0", _cli(*GEN, "--n", "0"), "num_images_per_prompt=0"),
    ("unknown scheduler", _cli(*GEN, "--scheduler", "PLMS"), "--scheduler"),
    ("--out is a file", _cli(*GEN, "--out", "{a_file}"), "--out"),
    ("--model empty", _cli(*GEN, "--model", ""), "model '' is empty"),
    ("--model cut short", _cli(*GEN, "--model", "{model_truncated}"), "diffusion_pytorch_model.safetensors"),
    ("--model config mismatched", _cli(*GEN, "--model", "{model_mismatched}"), "model-mismatched"),
    ("--adapter NaN weights", _cli(*GEN, "--adapter", "{adapter_nan}"), "adapter-nan.safetensors"),
    ("--adapter tensor missing", _cli(*GEN, "--adapter", "{adapter_missing}"), "adapter-missing.safetensors"),
    ("--adapter wrong shape", _cli(*GEN, "--adapter", "{adapter_shape}"), "adapter-shape.safetensors"),
    ("--adapter scale nan", _cli(*GEN, "--adapter", "{adapter}:nan"), "adapter"),
    ("edit steps 2000", _cli(*EDIT, "--steps", "2000"), "num_inference_steps=2000"),
    ("edit guidance inf", _cli(*EDIT, "--guidance", "inf"), "guidance_scale=inf"),
    ("edit quantile 2", _cli(*EDIT, "--quantile", "2"), "quantile=2.0"),
    ("edit mask floor inf", _cli(*EDIT, "--mask-floor", "inf"), "mask_floor=inf"),
    ("edit image missing", _cli("edit", "{tmp}/photo.png", "--source", "a", "--target", "b"), "photo.png"),
    ("edit image corrupt", _cli("edit", "{corrupt_png}", "--source", "a", "--target", "b"), "corrupt.png"),
    ("edit --out is a file", _cli(*EDIT, "--out", "{a_file}"), "--out"),
    ("edit --mask missing", _cli(*EDIT, "--mask", "{tmp}/mask.png"), "mask.png"),
    ("train config YAML broken", _cli("train", "--config", "{yaml_broken}"), "broken.yaml"),
    ("train steps ten million", _cli(*TRAIN, "--steps", "10000000"), "steps=10000000"),
    ("train learning rate nan", _cli(*TRAIN, "--lr", "nan"), "learning_rate=nan"),
    ("train --out is a file", _cli(*TRAIN, "--out", "{a_file}"), "output_dir"),
    ("train caption not UTF-8", _cli(*TRAIN, "--data", "{data_latin1}"), "a.txt is not UTF-8"),
    ("compose steps 5000", _cli("compose", "a sks", "--adapter", "{adapter}", "--region", "0,0,64,64:a sks",
                                "--steps", "5000"), "num_inference_steps=5000"),
    ("compose early stop -1", _cli("compose", "a sks", "--adapter", "{adapter}", "--region", "0,0,64,64:a sks",
                                   "--early-stop-from", "-1"), "min_refine_steps=-1"),
]


@pytest.mark.parametrize(("argv", "names"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_the_cli_exits_with_one_error_line_naming_the_field(files, tmp_path, capsys, monkeypatch, argv, names):
    monkeypatch.setenv("STUDIO_ADAPTER_DIR", str(tmp_path / "library"))
    try:
        code = main(argv(files, tmp_path))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None)
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and names in errors[0], err


# --- 3. The app's HTTP API ------------------------------------------------------------------------------------

GENERATE = {"prompt": "a red circle", "negative": "", "steps": 1, "api_name": "/generate"}
TABLE = {"headers": ["Adapter", "Trigger words", "Scale"]}

APP_CASES = [
    ("width 60", {**GENERATE, "width": 60}, "width=60"),
    ("height 100", {**GENERATE, "height": 100}, "height=100"),
    ("adapter unknown", {**GENERATE, "adapter_table": {**TABLE, "data": [["nope", "", 1.0]]}}, "'nope'"),
    ("adapter scale not a number", {**GENERATE, "adapter_table": {**TABLE, "data": [["nope", "", "abc"]]}},
     "scale 'abc'"),
    ("edit without an image", {"image": None, "source": "a", "target": "b", "painted": None, "steps": 1,
                               "api_name": "/edit"}, "image"),
    ("erase without a concept", {"concepts": "", "surrogate": "", "steps": 1, "name": "", "prompts": "",
                                 "api_name": "/erase"}, "concept"),
    ("jobs folder missing", {"upload": None, "folder": "/nonexistent/subjects", "settings": "", "steps": 1,
                             "api_name": "/jobs_submit"}, "/nonexistent/subjects"),
    ("jobs settings YAML broken", {"upload": None, "folder": "{data_parent}", "settings": "steps: [", "steps": 1,
                                   "api_name": "/jobs_submit"}, "not valid YAML"),
    ("jobs settings steps 0", {"upload": None, "folder": "{data_parent}", "settings": "steps: 0", "steps": None,
                               "api_name": "/jobs_submit"}, "steps=0"),
    ("jobs settings unknown field", {"upload": None, "folder": "{data_parent}", "settings": "bogus: 1",
                                     "steps": None, "api_name": "/jobs_submit"}, "'bogus'"),
    ("rename with nothing chosen", {"old": None, "new": "x", "api_name": "/adapters_rename"}, "adapter"),
]


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> Path:
    """A folder of one subject folder (what a jobs batch reads); jobs refused here never run."""
    root = tmp_path_factory.mktemp("subjects")
    (root / "red").mkdir()
    Image.new("RGB", (64, 64), "red").save(root / "red" / "a.png")
    return root


@pytest.mark.parametrize(("kwargs", "names"), [c[1:] for c in APP_CASES], ids=[c[0] for c in APP_CASES])
def test_the_app_refuses_with_the_reason_naming_the_field(app_url, subjects, kwargs, names):  # noqa: F811
    kwargs = {k: v.format(data_parent=subjects) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(Exception) as refused:
        Client(app_url, verbose=False).predict(**kwargs)
    assert names in str(refused.value)
    assert "Traceback" not in str(refused.value)


def test_there_are_at_least_sixty_bad_inputs():
    assert len(API_CASES) + len(CLI_CASES) + len(APP_CASES) >= 60
