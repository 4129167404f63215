"""The compositional shapes set: captions parse back, held-out scenes are new combinations of
seen parts, and the scorer reads every attribute of a true drawing right and a wrong one wrong;
edits change exactly what they name, and their scorer tells a right edit from a copied input."""

import dataclasses
import json
import random

import numpy as np
import pytest
from PIL import Image

from data_prep.shapes import (
    BACKGROUND,
    COLOURS,
    EDIT_KINDS,
    EDIT_TEMPLATES,
    SHAPES,
    Edit,
    Scene,
    Thing,
    apply_edit,
    edit_instruction,
    edit_split,
    find_objects,
    hold_out,
    main,
    make_split,
    pair_scenes,
    parse_caption,
    possible_edits,
    render,
    score_edit,
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


def test_hold_out_never_holds_out_an_item_with_a_pair_training_lacks():
    """The rule bites where a random pick would break it: the one item with a value no other
    item has is never held out, and with nothing to spare there is no split."""
    grid = [(c, s, z) for c in "rg" for s in "os" for z in "SL"]  # each pair in two items
    lonely = ("r", "o", "Q")
    for seed in range(50):
        split = hold_out([*grid, lonely], 2 / 9, seed, list)
        assert len(split.held_out) == 2 and lonely in split.seen
    with pytest.raises(ValueError, match="no split"):
        hold_out([("a", "x"), ("b", "y")], 1 / 2, 0, list)


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


def test_apply_edit_changes_exactly_the_named_attribute():
    pairs = set(pair_scenes())
    for scene in single_scenes():
        (thing,) = scene.things
        edits = possible_edits(scene)
        assert [sum(e.kind == k for e in edits) for k in EDIT_KINDS] == [3, 2, 2, 18]
        for edit in edits:
            target = apply_edit(scene, edit)
            if edit.kind == "add":
                assert target in pairs
                kept, added = target.things[:: 1 if edit.position == "right" else -1]
                assert (kept.colour, kept.shape) == (thing.colour, thing.shape)
                assert (added.colour, added.shape) == (edit.colour, edit.shape)
                continue
            (changed,) = target.things
            differ = [k for k, v in vars(thing).items() if vars(changed)[k] != v]
            named = {"recolour": "colour", "move": "position", "reshape": "shape"}[edit.kind]
            assert differ == [named] and vars(changed)[named] == vars(edit)[named]
    scene = Scene((Thing("red", "circle", "large", "left"),))
    for wrong in (Edit("recolour", colour="red"), Edit("add", "red", "square", "right")):
        with pytest.raises(ValueError, match="not an edit"):
            apply_edit(scene, wrong)
    with pytest.raises(ValueError, match="one-object"):
        apply_edit(pair_scenes()[0], Edit("recolour", colour="blue"))


def test_edit_instructions_name_the_edit_in_each_phrasing():
    scene = Scene((Thing("red", "circle", "large", "left"),))
    said = {
        kind: {edit_instruction(scene, edit, random.Random(seed)) for seed in range(40)}
        for kind, edit in (
            ("recolour", Edit("recolour", colour="blue")),
            ("move", Edit("move", position="right")),
            ("reshape", Edit("reshape", shape="square")),
            ("add", Edit("add", "blue", "square", "right")),
        )
    }
    assert {k: len(v) for k, v in said.items()} == {k: len(t) for k, t in EDIT_TEMPLATES.items()}
    assert "make the circle blue" in said["recolour"]
    assert "move the circle to the right" in said["move"]
    assert "turn the red circle into a square" in said["reshape"]
    assert "add a blue square to the right of it" in said["add"]
    assert "put the circle in the center" in {
        edit_instruction(scene, Edit("move", position="center"), random.Random(s))
        for s in range(40)
    }
    rng, again = random.Random(3), random.Random(3)
    edits = possible_edits(scene)
    assert [edit_instruction(scene, e, rng) for e in edits] == [
        edit_instruction(scene, e, again) for e in edits
    ]


def test_held_out_edits_are_new_combinations_of_seen_parts():
    singles, pairs = make_split(single_scenes(), 1 / 6, 0), make_split(pair_scenes(), 1 / 6, 0)
    targets = singles.seen + pairs.seen
    split = edit_split(list(singles.seen), list(targets), 1 / 6, seed=0)
    assert split == edit_split(list(singles.seen), list(targets), 1 / 6, seed=0)
    assert list(split) == list(EDIT_KINDS)
    for kind, cases in split.items():
        assert cases.held_out and set(cases.seen).isdisjoint(cases.held_out)
        assert all(e.kind == kind for _, e in cases.seen + cases.held_out)
        assert all(
            s in singles.seen and apply_edit(s, e) in targets
            for s, e in cases.seen + cases.held_out
        )
        seen_pairs = {(a, b) for case in cases.seen for a in _parts(case) for b in _parts(case)}
        for case in cases.held_out:
            assert {(a, b) for a in _parts(case) for b in _parts(case)} <= seen_pairs, case


def _parts(case: tuple[Scene, Edit]) -> set:
    scene, edit = case
    return {*vars(scene.things[0]).values(), *(("edit", v) for v in vars(edit).values() if v)}


def test_score_edit_tells_a_right_edit_from_a_copied_input():
    """True drawings of the target are exactly right; the input, copied, is exactly right
    never and leaves everything untouched; a right edit that also changed an untouched
    attribute is not exactly right and loses that attribute."""
    rng = random.Random(4)
    for scene in single_scenes()[::9]:
        for edit in possible_edits(scene):
            target = render(apply_edit(scene, edit), 32, rng)
            copied = render(scene, 32, rng)
            assert score_edit(target, scene, edit) == {
                "exactly_right": 1.0,
                "untouched_preserved": 1.0,
            }, (scene, edit)
            assert score_edit(copied, scene, edit) == {
                "exactly_right": 0.0,
                "untouched_preserved": 1.0,
            }, (scene, edit)
    scene = Scene((Thing("red", "circle", "large", "left"),))
    recoloured_and_reshaped = render(Scene((Thing("blue", "square", "large", "left"),)), 32, rng)
    assert score_edit(recoloured_and_reshaped, scene, Edit("recolour", colour="blue")) == {
        "exactly_right": 0.0,
        "untouched_preserved": 2 / 3,
    }
    recoloured_and_added = render(
        Scene((Thing("yellow", "circle"), Thing("blue", "square"))), 32, rng
    )
    assert score_edit(recoloured_and_added, scene, Edit("add", "blue", "square", "right")) == {
        "exactly_right": 0.0,
        "untouched_preserved": 0.0,
    }
