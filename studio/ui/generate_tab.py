"""The Generate tab: prompt, settings and adapters from the library in; images and the settings that made them out."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from pipelines import SCHEDULERS, LoadedModel, generate, save_images
from studio.library import AdapterLibrary

from .common import MODEL_QUEUE, OnShow, handler

TITLE = "Generate"


def adapter_rows(current: list[list] | None = None) -> list[list]:
    """One [name, scale] row per library adapter (scale 0: not used), keeping the scales already set."""
    scales = {name: scale for name, scale in current or []}
    return [[entry.name, scales.get(entry.name, 0)] for entry in AdapterLibrary().list()]


def build(model: LoadedModel, out_dir: Path) -> OnShow:
    """Lay out the tab inside the current gr.Blocks and bind its events to `model`."""

    @handler
    def run(prompt: str, negative: str, seed: float | None, steps: float, guidance: float, width: float, height: float,
            scheduler: str, n: float, adapter_scales: list[list] | None = None,
            progress: gr.Progress = gr.Progress()) -> tuple[list, str]:
        library = AdapterLibrary()
        result = generate(
            model, prompt, negative_prompt=negative, seed=None if seed is None or seed < 0 else int(seed),
            num_inference_steps=int(steps), guidance_scale=guidance, width=int(width), height=int(height),
            scheduler=scheduler, num_images_per_prompt=int(n),
            adapters=[(library.get(name).path, float(scale)) for name, scale in adapter_scales or [] if scale],
            callback=lambda step, total: progress((step, total), desc="denoising", unit="steps"),
        )
        paths = save_images(result, out_dir)
        infotexts = [s.infotext() for s in result.settings]
        return [(str(p), text) for p, text in zip(paths, infotexts)], "\n\n".join(infotexts)

    pipe = model.pipe
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size_step = max(8, pipe.vae_scale_factor)
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle on the left", elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULERS), value="DDIM", label="Sampler", elem_id="gen-scheduler")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="gen-seed")
            steps = gr.Slider(1, 150, value=25, step=1, label="Steps", elem_id="gen-steps")
            guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG scale", elem_id="gen-guidance")
            with gr.Row():
                width = gr.Slider(size_step, max(1024, native * 2), value=native, step=size_step, label="Width",
                                  elem_id="gen-width")
                height = gr.Slider(size_step, max(1024, native * 2), value=native, step=size_step, label="Height",
                                   elem_id="gen-height")
            n = gr.Slider(1, 8, value=1, step=1, label="Number of images", elem_id="gen-n")
            with gr.Accordion("Adapters (from the library; scale 0: not used)", open=False):
                adapters = gr.Dataframe(adapter_rows(), headers=["Adapter", "Scale"], datatype=["str", "number"],
                                        type="array", static_columns=[0], show_label=False, elem_id="gen-adapters")
                refresh = gr.Button("Refresh the list", size="sm", elem_id="gen-adapters-refresh")
            button = gr.Button("Generate", variant="primary", elem_id="gen-button")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Images", columns=4, format="png", elem_id="gen-gallery")
            settings = gr.Textbox(label="Settings (A1111 parameters)", lines=4, interactive=False,
                                  elem_id="gen-settings")
    gr.on([button.click, prompt.submit], run,
          inputs=[prompt, negative, seed, steps, guidance, width, height, scheduler, n, adapters],
          outputs=[gallery, settings], api_name="generate", concurrency_id=MODEL_QUEUE)
    refresh.click(adapter_rows, adapters, adapters, api_visibility="private")
    return OnShow(adapter_rows, [adapters], [adapters])
