"""The Shapes world's fixed values (studio/shapes/world.py) and the seeded dataset builder."""

import random
import re

import numpy as np
import pytest
from PIL import Image

from studio.shapes.analyzer import analyze
from studio.shapes.dataset import build_dataset, main, subject_images, subject_scenes
from studio.shapes.world import (
    BACKGROUNDS,
    BASE_SHAPES,
    CANVAS,
    COLORS,
    HELD_OUT_SHAPES,
    POSITIONS,
    SHAPES,
    render,
    sample_scene,
)

# The world's caption grammar; the held-out outline style is the word `outline` before the shape.
_NOUN = rf"a (?:(?:small|large) )?(?:{'|'.join(COLORS)}) (?:outline )?(?:{'|'.join(SHAPES)})"
_PAIR_NOUN = rf"a (?:{'|'.join(COLORS)}) (?:outline )?(?:{'|'.join(SHAPES)})"
CAPTION = re.compile(
    rf"{_NOUN}(?: on the (?:left|right|top|bottom))?(?: on a (?:black|gray) background)?"
    rf"|{_PAIR_NOUN} on the left and {_PAIR_NOUN} on the right"
    rf"|{_PAIR_NOUN} on the top and {_PAIR_NOUN} on the bottom"
)


def _read(paths):
    return [(p.read_bytes(), p.with_suffix(".txt").read_text()) for p in paths]


def test_same_seed_same_files(tmp_path):
    a = build_dataset(tmp_path / "a", 20, seed=3, shapes=SHAPES, outline_prob=0.3)
    b = build_dataset(tmp_path / "b", 20, seed=3, shapes=SHAPES, outline_prob=0.3)
    c = build_dataset(tmp_path / "c", 20, seed=4, shapes=SHAPES, outline_prob=0.3)
    assert [p.name for p in a] == [f"{i:06d}.png" for i in range(20)]
    assert _read(a) == _read(b)
    assert _read(a) != _read(c)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [p.name for p in a] + [p.with_suffix(".txt").name for p in a]
    )  # no temporary files left behind


def test_sidecars_are_the_scenes_captions_and_follow_the_grammar(tmp_path):
    paths = build_dataset(tmp_path, 40, seed=0, shapes=SHAPES, outline_prob=0.5)
    rng = random.Random(0)
    for path in paths:
        scene = sample_scene(rng, SHAPES, 0.3, 0.5)
        text = path.with_suffix(".txt").read_text()
        assert text == scene.caption()
        assert CAPTION.fullmatch(text), text
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(render(scene)))


def test_grammar_over_many_scenes():
    rng = random.Random(1)
    for _ in range(2000):
        text = sample_scene(rng, SHAPES, outline_prob=0.3).caption()
        assert CAPTION.fullmatch(text), text
        assert "  " not in text and text == text.lower()


def test_world_values_are_exact():
    rng = random.Random(2)
    for _ in range(200):
        scene = sample_scene(rng, SHAPES, outline_prob=0.3)
        pixels = np.asarray(render(scene))
        assert pixels.shape == (CANVAS, CANVAS, 3) and pixels.dtype == np.uint8
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert tuple(pixels[y, x]) == BACKGROUNDS[scene.background]
        for obj, (jx, jy) in zip(scene.objects, scene.jitter):
            if obj.shape != "ring" and not obj.outline:  # a ring's or an outline's centre is hollow
                cx, cy = POSITIONS[obj.position]
                assert tuple(pixels[cy + jy, cx + jx]) == COLORS[obj.color], obj


def test_base_dataset_never_shows_held_out_concepts(tmp_path):
    paths = build_dataset(tmp_path, 200, seed=5)
    captions = [p.with_suffix(".txt").read_text() for p in paths]
    assert any("on the left and" in c for c in captions)  # two-object scenes are there
    for text in captions:
        words = set(text.split())
        assert not words & set(HELD_OUT_SHAPES) and "outline" not in words, text
        assert words & set(BASE_SHAPES), text


def test_refuses_a_folder_with_other_files(tmp_path):
    build_dataset(tmp_path, 5, seed=0)
    build_dataset(tmp_path, 5, seed=0)  # re-running the same build is fine
    with pytest.raises(FileExistsError, match="4 other image"):  # 000003 and 000004, .png and .txt
        build_dataset(tmp_path, 3, seed=0)
    with pytest.raises(ValueError, match="world shapes"):
        build_dataset(tmp_path / "x", 3, seed=0, shapes=("hexagon",))


def test_subject_set_varies_and_is_read_back(tmp_path):
    scenes = subject_scenes("orange", "star", 5, seed=0, backgrounds=("white", "gray"))
    assert {s.objects[0].position for s in scenes} == set(POSITIONS)
    assert {s.objects[0].size for s in scenes} == {None, "small", "large"}
    assert {s.background for s in scenes} == {"white", "gray"}
    paths = subject_images(tmp_path, "orange", "star", 5, seed=0, caption="a sks star", backgrounds=("white", "gray"))
    for path, scene in zip(paths, scenes):
        assert path.with_suffix(".txt").read_text() == "a sks star"
        (found,) = analyze(Image.open(path)).objects
        assert (found.color, found.shape, found.position) == ("orange", "star", scene.objects[0].position)
    with pytest.raises(ValueError, match="positions"):
        subject_scenes("orange", "star", 5, seed=0, positions=("middle",))


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "30", "--seed", "0", "--held-out"])
    assert len(list(tmp_path.glob("*.png"))) == len(list(tmp_path.glob("*.txt"))) == 30
    assert "wrote 30 images" in capsys.readouterr().out
    words = {w for p in tmp_path.glob("*.txt") for w in p.read_text().split()}
    assert words & set(HELD_OUT_SHAPES)
