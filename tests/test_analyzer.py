"""The analyzer must read rendered ground truth (its target: >= 98 % fully correct) and stay sane on bad input."""

import random

import numpy as np
import pytest
from PIL import Image

from studio.shapes.analyzer import ATTRIBUTES, analyze, matches, outline_visible, score_scene
from studio.shapes.world import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    Scene,
    ShapeObject,
    render,
    sample_scene,
    shape_mask,
)

N_RENDERS = 500


def test_accuracy_on_rendered_ground_truth():
    rng = random.Random(2024)
    scenes = [sample_scene(rng, SHAPES, two_object_prob=0.3, outline_prob=0.3) for _ in range(N_RENDERS)]
    objects = [o for s in scenes for o in s.objects]
    # The sample must cover the whole world, or the accuracy below says less than it seems to.
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {o.size for o in objects} == {None, "small", "large"}
    assert {o.outline for o in objects} == {False, True}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert sum(len(s.objects) == 2 for s in scenes) >= 100

    results = [score_scene(render(s), s) for s in scenes]
    accuracy = {key: float(np.mean([r[key] for r in results])) for key in (*ATTRIBUTES, "count", "all")}
    accuracy["two-object all"] = float(np.mean([r["all"] for s, r in zip(scenes, results) if len(s.objects) == 2]))
    report = ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
    assert accuracy["all"] >= 0.98, report
    assert accuracy["two-object all"] >= 0.98, report
    assert accuracy["count"] >= 0.98, report


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_empty_image_has_no_objects(background):
    analysis = analyze(render(Scene((), background)))
    assert analysis.background == background
    assert analysis.objects == []


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_at_each_size_and_style(shape):
    for i, (size, outline, background) in enumerate(
        (size, outline, background) for size in (None, "small", "large") for outline in (False, True)
        for background in BACKGROUNDS
    ):
        obj = ShapeObject(list(COLORS)[i % len(COLORS)], shape, "center", size, outline)
        result = score_scene(render(Scene((obj,), background)), Scene((obj,), background))
        assert all(result.values()), (obj, background, result)


def test_outline_and_filled_are_told_apart():
    for shape in SHAPES:
        for outline in (False, True):
            (found,) = analyze(render(Scene((ShapeObject("blue", shape, "left", "large", outline),)))).objects
            assert (found.shape, found.outline) == (shape, outline)


def test_small_ring_outline_is_invisible_and_scored_either_way():
    filled, outlined = (render(Scene((ShapeObject("red", "ring", "center", "small", o),))) for o in (False, True))
    assert not outline_visible("ring", 7) and outline_visible("ring", 12)
    assert np.array_equal(np.asarray(filled), np.asarray(outlined))
    assert score_scene(outlined, ShapeObject("red", "ring", "center", "small", True), ["outline"])["outline"]


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_background_of_each_kind(background):
    # A large object pushed towards the border must not outvote the background.
    scene = Scene((ShapeObject("purple", "square", "left", "large"),), background, ((-3, 3),))
    assert analyze(render(scene)).background == background


@pytest.mark.parametrize("pair", [("left", "right"), ("top", "bottom")])
def test_two_objects_at_their_closest_stay_apart(pair):
    scene = Scene(
        (ShapeObject("red", "square", pair[0]), ShapeObject("green", "square", pair[1])),
        jitter=((3, 3), (-3, -3)),
    )
    analysis = analyze(render(scene))
    assert len(analysis.objects) == 2
    assert all(score_scene(render(scene), scene).values())


def test_pairing_follows_positions_not_order():
    scene = Scene((ShapeObject("red", "circle", "left"), ShapeObject("blue", "star", "right")))
    swapped = Scene(scene.objects[::-1])
    assert matches(analyze(render(scene)), swapped)["all"]


def test_missing_object_fails_every_attribute():
    image = render(Scene((ShapeObject("red", "circle", "left"),)))
    expected = Scene((ShapeObject("red", "circle", "left"), ShapeObject("blue", "star", "right")))
    assert matches(analyze(image), expected) == {"color": False, "shape": False, "position": False,
                                                "count": False, "all": False}


def test_geometry_fields_match_the_render():
    obj = ShapeObject("orange", "triangle", "bottom", "large")
    (found,) = analyze(render(Scene((obj,), "gray", ((2, -1),)))).objects
    truth = shape_mask("triangle", 34, 47, 12)
    assert (found.mask & truth).sum() / (found.mask | truth).sum() > 0.9
    assert found.center == (34.0, 47.0)
    assert found.bbox == (22, 36, 46, 59)  # the apex pixel (row 35) is less than half covered
    assert found.area == found.mask.sum()
    assert abs(found.centroid[1] - (47 + 12 / 3)) < 0.5  # a triangle's centroid is a third of the way up
    assert found.fit > 0.99
    assert found.rgb == COLORS["orange"]


def test_other_image_sizes_and_array_input():
    scene = Scene((ShapeObject("yellow", "cross", "top", "small"),), "black", ((1, 2),))
    image = render(scene)
    assert all(score_scene(image.resize((256, 256), Image.NEAREST), scene).values())
    assert all(score_scene(np.asarray(image), scene).values())
    with pytest.raises(ValueError, match="HxWx3"):
        analyze(np.zeros((64, 64)))


def test_noise_and_specks_are_ignored():
    scene = Scene((ShapeObject("green", "star", "right"),), "gray")
    rng = np.random.default_rng(0)
    pixels = np.asarray(render(scene)).astype(np.float32) + rng.normal(0, 10, (64, 64, 3))
    for x, y in ((5, 5), (58, 10), (20, 55)):
        pixels[y:y + 2, x:x + 2] = COLORS["red"]  # 4-px specks, far below an object's area
    analysis = analyze(np.clip(pixels, 0, 255).astype(np.uint8))
    assert len(analysis.objects) == 1
    assert all(score_scene(np.clip(pixels, 0, 255).astype(np.uint8), scene).values())


def test_never_crashes_on_garbage():
    rng = np.random.default_rng(1)
    for image in (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.full((64, 64, 3), 200, np.uint8),
                  np.full((32, 48, 3), COLORS["red"], np.uint8)):
        analysis = analyze(image)
        assert analysis.background in BACKGROUNDS
        assert all(o.area >= 12 for o in analysis.objects)


def test_unknown_attribute_is_refused():
    with pytest.raises(ValueError, match="unknown attributes"):
        matches(analyze(render(Scene(()))), Scene(()), ["colour"])
