"""`compose` (pipelines/compose.py): merged weights and LoRA-Composer on a tiny SD 1.5-layout pipeline."""

import numpy as np
import pytest

from adapters import LoRA, LoRAConfig, save_adapter
from pipelines import InputError, generate
from pipelines.architectures import build_unet
from pipelines.compose import ComposeRegion, ComposerSettings, compose, concept_tokens
from tests.adapter_helpers import perturb

LEFT, RIGHT = ComposeRegion((0, 0, 32, 64), "a sks"), ComposeRegion((32, 0, 64, 64), "a zkz dog")


@pytest.fixture
def concepts(tiny_sd15, tmp_path):
    paths = []
    for seed, trigger in ((0, "sks"), (1, "zkz")):
        lora = LoRA.from_unet(tiny_sd15.unet, LoRAConfig(rank=2))
        perturb(lora, seed)
        paths.append(save_adapter(lora, tmp_path / f"{trigger}.safetensors", trigger_words=[trigger]))
    return paths


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in result.images])


def test_composer_is_seeded_records_its_settings_and_leaves_the_pipeline_as_it_was(tiny_sd15, concepts):
    before = _pixels(generate(tiny_sd15, "a sks and a zkz dog", seed=3, num_inference_steps=4))
    processors = dict(tiny_sd15.unet.attn_processors)
    kwargs = dict(adapters=[(p, None) for p in concepts], regions=[LEFT, RIGHT], seed=3, num_inference_steps=4)
    first = compose(tiny_sd15, "a sks and a zkz dog", **kwargs)
    again = compose(tiny_sd15, "a sks and a zkz dog", **kwargs)
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.allclose(_pixels(first), before, atol=1)
    params = first.settings[0].extra_params
    assert params["Compose"] == "composer" and params["Adapters"] == "sks:1, zkz:1"
    assert params["Refined steps"] >= 1 and "concept 8, fill 2, region 10" in params["Composer"]
    assert '"a zkz dog"' in params["Regions"]
    assert all(tiny_sd15.unet.attn_processors[k] is v for k, v in processors.items())
    after = _pixels(generate(tiny_sd15, "a sks and a zkz dog", seed=3, num_inference_steps=4))
    assert np.array_equal(after, before)


def test_without_guidance_or_reinitialisation_the_composer_is_regional_prompting(tiny_sd15, concepts):
    """The loss-guided update and the re-initialisation change the image; with both off it still runs."""
    off = ComposerSettings(refine_until=0, reinitialise=False)
    kwargs = dict(adapters=[(p, None) for p in concepts], regions=[LEFT, RIGHT], seed=0, num_inference_steps=3)
    plain = compose(tiny_sd15, "two things", composer=off, **kwargs)
    guided = compose(tiny_sd15, "two things", **kwargs)
    assert plain.settings[0].extra_params["Refined steps"] == 0
    assert not np.array_equal(_pixels(plain), _pixels(guided))


def test_the_early_stop_is_per_image_so_an_image_does_not_depend_on_its_batch(tiny_sd15, concepts, monkeypatch):
    """Image 0's loss rises from step 2 on, image 1's keeps falling (offsets added to the real loss; their sum
    rises): image 0 stops refining at step 2, image 1 refines to the end, and image 1 comes out as it does when
    drawn alone with its seed and the same falling loss."""
    import pipelines.compose as compose_module

    real, calls = compose_module.composer_loss, []

    def scripted(maps, regions, size, weights, cells):
        loss = real(maps, regions, size, weights, cells)
        step = len(calls)
        calls.append(step)
        rising, falling = 100.0 * step, -10.0 * step
        offset = [falling] if loss.shape[0] == 1 else [rising, falling]
        return loss + loss.new_tensor(offset)

    monkeypatch.setattr(compose_module, "composer_loss", scripted)
    settings = ComposerSettings(min_refine_steps=2, reinitialise=False)
    kwargs = dict(adapters=[(p, None) for p in concepts], regions=[LEFT, RIGHT], num_inference_steps=5,
                  composer=settings)
    pair = compose(tiny_sd15, "two things", seed=7, num_images_per_prompt=2, **kwargs)
    assert [s.extra_params["Refined steps"] for s in pair.settings] == [2, 5]
    calls.clear()
    alone = compose(tiny_sd15, "two things", seed=8, **kwargs)
    assert alone.settings[0].extra_params["Refined steps"] == 5
    np.testing.assert_allclose(_pixels(alone)[0], _pixels(pair)[1], atol=2)


def test_merge_mode_equals_the_adapters_attached_at_their_weights(tiny_sd15, concepts):
    merged = compose(tiny_sd15, "a sks and a zkz dog", adapters=[(concepts[0], 0.7), (concepts[1], 0.4)],
                     mode="merge", seed=1, num_inference_steps=4)
    attached = generate(tiny_sd15, "a sks and a zkz dog", adapters=[(concepts[0], 0.7), (concepts[1], 0.4)], seed=1,
                        num_inference_steps=4)
    assert np.abs(_pixels(merged) - _pixels(attached)).max() <= 1  # 8-bit rounding of fp32-equal images
    assert merged.settings[0].extra_params["Compose"] == "merge"


def test_merge_mode_off_the_unconditional_rows_equals_the_adapters_attached_off_them(tiny_sd15, concepts):
    adapters = [(concepts[0], 0.7), (concepts[1], 0.4)]
    kwargs = dict(seed=1, num_inference_steps=4)
    merged = compose(tiny_sd15, "a sks and a zkz dog", adapters=adapters, mode="merge", adapters_on_uncond=False,
                     **kwargs)
    attached = generate(tiny_sd15, "a sks and a zkz dog", adapters=adapters, adapters_on_uncond=False, **kwargs)
    fused = compose(tiny_sd15, "a sks and a zkz dog", adapters=adapters, mode="merge", **kwargs)
    assert np.abs(_pixels(merged) - _pixels(attached)).max() <= 1
    assert np.abs(_pixels(merged) - _pixels(fused)).max() > 1
    assert merged.settings[0].extra_params["Adapters on uncond"] == "False"


def test_composer_options_beyond_the_paper_change_the_image_and_are_recorded(tiny_sd15, concepts):
    """every_delta and cells="touched" (ComposerSettings) each act on a UNet-only LoRA's concepts; the PNG says
    which were on; adapters_on_uncond=False changes the guided image too. Boxes off the grid lines (a 4x4 map at
    128 px), so that the cells they touch are more than those inside them."""
    regions = [ComposeRegion((4, 16, 60, 112), "a sks"), ComposeRegion((68, 16, 124, 112), "a zkz dog")]
    kwargs = dict(adapters=[(p, None) for p in concepts], regions=regions, seed=0, num_inference_steps=3,
                  width=128, height=128)
    runs = {name: compose(tiny_sd15, "two things", composer=settings, **kwargs)
            for name, settings in (("published", ComposerSettings()),
                                   ("every delta", ComposerSettings(every_delta=True)),
                                   ("touched", ComposerSettings(cells="touched", reinitialise=False)),
                                   ("inside", ComposerSettings(reinitialise=False)))}
    runs["off uncond"] = compose(tiny_sd15, "two things", adapters_on_uncond=False, **kwargs)
    assert not np.array_equal(_pixels(runs["every delta"]), _pixels(runs["published"]))
    assert not np.array_equal(_pixels(runs["touched"]), _pixels(runs["inside"]))
    assert not np.array_equal(_pixels(runs["off uncond"]), _pixels(runs["published"]))
    assert "every delta in its box" in runs["every delta"].settings[0].extra_params["Composer"]
    assert "cells touched" in runs["touched"].settings[0].extra_params["Composer"]
    assert "every delta" not in runs["published"].settings[0].extra_params["Composer"]


def test_an_unknown_cell_rule_is_refused():
    with pytest.raises(InputError, match="cells='corners'.*'inside'.*'touched'"):
        ComposerSettings(cells="corners")


@pytest.mark.parametrize("regions, message", [
    ([ComposeRegion((0, 0, 40, 64), "a sks"), ComposeRegion((32, 0, 64, 64), "a zkz")], "overlap"),
    ([ComposeRegion((0, 0, 32, 64), "a sks"), ComposeRegion((32, 0, 96, 64), "a zkz")], "not inside the 64x64"),
    ([ComposeRegion((0, 0, 16, 16), "a sks"), ComposeRegion((32, 0, 64, 64), "a zkz")], "smaller than one"),
    ([ComposeRegion((0, 0, 32, 64), "a sks")], "2 concepts but 1 regions"),
    ([ComposeRegion((0, 0, 32, 64), " "), ComposeRegion((32, 0, 64, 64), "a zkz")], "prompt is empty"),
])
def test_bad_regions_are_refused_before_the_model_runs(tiny_sd15, concepts, regions, message):
    calls = []
    handle = tiny_sd15.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(InputError, match=message):
        compose(tiny_sd15, "two things", adapters=[(p, None) for p in concepts], regions=regions, seed=0)
    handle.remove()
    assert not calls


def test_an_adapter_for_another_base_is_refused(tiny_sd15, concepts, tmp_path):
    other = LoRA.from_unet(build_unet("tiny-sdxl"), LoRAConfig(rank=2))
    other_file = save_adapter(other, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="adapters\\[1\\].*SDXL"):
        compose(tiny_sd15, "two things", adapters=[(concepts[0], None), (other_file, None)], regions=[LEFT, RIGHT])


def test_concept_tokens_are_found_whole_even_when_a_word_takes_several_tokens(tiny_sd15):
    tokenizer = tiny_sd15.tokenizer
    word = "zkzqv"
    pieces = tokenizer(word, add_special_tokens=False).input_ids
    assert len(pieces) > 1
    found = concept_tokens(tokenizer, f"a photo of a red {word} dog", [word])
    ids = tokenizer(f"a photo of a red {word} dog").input_ids
    assert [ids[i] for i in found] == pieces
    n = len(tokenizer("a dog").input_ids)  # start, the prompt's tokens, end
    assert concept_tokens(tokenizer, "a dog", ["cat"]) == tuple(range(1, n - 1))  # no trigger: the whole prompt
