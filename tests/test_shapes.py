"""The compositional shapes set: captions parse back, held-out scenes are new combinations of
seen parts, and the scorer reads every attribute of a true drawing right and a wrong one wrong."""

import dataclasses
import json
import random

import numpy as np
import pytest
from PIL import Image

from data_prep.shapes import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    Scene,
    Thing,
    find_objects,
    main,
    make_split,
    pair_scenes,
    parse_caption,
    render,
    score_image,
    score_samples,
    single_scenes,
)


def test_every_caption_parses_back_to_its_scene():
    for scene in single_scenes() + pair_scenes():
        assert parse_caption(scene.caption()) == scene
        assert parse_caption(scene.caption(left_first=False)) == scene
    assert parse_caption("A large red circle on the left.") == Scene(
        (Thing("red", "circle", "large", "left"),)
    )
    for wrong in (
        "a red circle on the left",
        "a large red circle",
        "a large red hexagon on the left",
        "a small red circle to the left of a blue square",
        "",
    ):
        assert parse_caption(wrong) is None


@pytest.mark.parametrize("scenes", [single_scenes(), pair_scenes()], ids=["single", "pairs"])
def test_held_out_scenes_are_new_combinations_of_seen_parts(scenes):
    split = make_split(scenes, 1 / 6, seed=0)
    assert len(split.held_out) == round(len(scenes) / 6)
    assert set(split.seen).isdisjoint(split.held_out) and len(split.seen) + len(
        split.held_out
    ) == len(scenes)
    assert make_split(scenes, 1 / 6, seed=0) == split  # deterministic
    seen_values = {
        (i, v) for s in split.seen for i, t in enumerate(s.things) for v in vars(t).values()
    }
    for scene in split.held_out:
        assert {(i, v) for i, t in enumerate(scene.things) for v in vars(t).values()} <= seen_values


@pytest.mark.parametrize("size", [32, 64])
def test_the_scorer_reads_true_drawings_right(size):
    rng = random.Random(0)
    for scene in single_scenes() + pair_scenes():
        image = render(scene, size, rng)
        result = score_image(image, scene)
        assert result["all"], (scene, result)
        assert len(find_objects(image)) == len(scene.things), scene  # edges are no objects


def test_the_scorer_reads_each_wrong_attribute_wrong():
    rng = random.Random(1)
    thing = Thing("red", "circle", "large", "left")
    image = render(Scene((thing,)), 32, rng)
    for field, other in (
        ("colour", "blue"),
        ("shape", "square"),
        ("size", "small"),
        ("position", "right"),
    ):
        result = score_image(image, Scene((dataclasses.replace(thing, **{field: other}),)))
        assert not result[field] and not result["all"]
        assert all(v for k, v in result.items() if k not in (field, "all"))
    pair = Scene((Thing("green", "triangle"), Thing("yellow", "square")))
    image = render(pair, 32, rng)
    assert not score_image(image, Scene(pair.things[::-1]))["relation"]
    assert not score_image(image, Scene((Thing("green", "circle"), Thing("yellow", "square"))))[
        "shapes"
    ]
    assert not score_image(image, Scene((Thing("green", "triangle"), Thing("blue", "square"))))[
        "colours"
    ]


def test_blank_and_speckled_images_score_nothing():
    rng = np.random.default_rng(0)
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    speckle = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for image in (blank, speckle):
        for colour in COLOURS:
            assert not score_image(image, Scene((Thing(colour, SHAPES[0], "large", "center"),)))[
                "all"
            ]


def test_score_samples_reads_generate_output(tmp_path, capsys):
    """mtf-generate's folder (samples.jsonl + sample_NNNN_0.png): shapes prompts are scored,
    others skipped; the command prints one line per prompt and the totals."""
    rng = random.Random(2)
    right = Scene((Thing("blue", "square", "small", "right"),))
    pair = Scene((Thing("red", "circle"), Thing("green", "triangle")))
    prompts = [right.caption(), "red heart", pair.caption(left_first=False)]
    drawn = [right, Scene((Thing("yellow", "circle", "large", "left"),)), Scene(pair.things[::-1])]
    for index, scene in enumerate(drawn):
        Image.fromarray(render(scene, 32, rng)).save(tmp_path / f"sample_{index:04d}_0.png")
    records = "".join(json.dumps({"prompt": p, "output": ""}) + "\n" for p in prompts)
    (tmp_path / "samples.jsonl").write_text(records)
    results = score_samples(tmp_path)
    assert [prompt for prompt, _ in results] == [prompts[0], prompts[2]]
    assert results[0][1]["all"] and not results[1][1]["relation"] and results[1][1]["shapes"]
    main(["score", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["right", *prompts[0].split()]
    assert out[1].split() == ["wrong:", "relation", *prompts[2].split()]
    assert out[-1] == (
        "shapes scores: colour 1/1, shape 1/1, size 1/1, position 1/1, "
        "colours 1/1, shapes 1/1, relation 0/1, all 1/2"
    )
