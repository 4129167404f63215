"""The editing benchmark's parts, without training: its Parquet holds renders of each edit's
input and result, training never shows a held-out edit or a scene the base run held out, the
scoring of mtf-generate's folder gives true results 100% and copied inputs the copy baseline,
and the commands it would run take the base run's tokenizer, VAE, weights and data."""

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from benchmarks import editing
from benchmarks import learning_quality as lq
from benchmarks.editing import (
    Base,
    edit_cases,
    edit_test_cases,
    find_base,
    read_image,
    read_samples,
    score_edits,
    write_edit_prompts,
    write_training_examples,
)
from checkpoints import layout
from data_prep.images import decode_image, encode_png
from data_prep.shapes import BACKGROUND, EDIT_KINDS, apply_edit, render, score_image
from megatron_transfusion.config import parse_override


@pytest.fixture(scope="module")
def cases():
    return edit_cases(split_seed=0)


def test_training_parquet_holds_renders_of_each_edit(tmp_path, cases):
    path = tmp_path / "edits.parquet"
    written = write_training_examples(path, cases, 48, 32, seed=0)
    table = pq.read_table(path)
    assert table.column_names == ["input_image", "instruction", "output_image"]
    assert table.schema.types == [pa.binary(), pa.string(), pa.binary()]
    assert table.num_rows == 48 and {e.kind for _, e in written} == set(EDIT_KINDS)
    for row, (scene, edit) in zip(table.to_pylist(), written, strict=True):
        before, after = (np.asarray(decode_image(row[k])) for k in ("input_image", "output_image"))
        assert before.shape == after.shape == (32, 32, 3)
        assert score_image(before, scene)["all"], (scene, edit)
        assert score_image(after, apply_edit(scene, edit))["all"], (scene, edit)
        value = edit.colour if edit.kind in ("recolour", "add") else edit.shape or edit.position
        assert value in row["instruction"].split(), row["instruction"]
        if edit.kind == "recolour":  # drawn with the same jitter: the same pixels, recoloured
            drawn = [(image != BACKGROUND).any(axis=-1) for image in (before, after)]
            assert (drawn[0] == drawn[1]).all(), (scene, edit)
    assert write_training_examples(tmp_path / "again.parquet", cases, 48, 32, seed=0) == written
    assert (tmp_path / "again.parquet").read_bytes() == path.read_bytes()


def test_training_never_shows_a_held_out_edit_or_scene(tmp_path, cases):
    singles, pairs = lq.scene_splits(0)
    written = write_training_examples(tmp_path / "edits.parquet", cases, 400, 32, seed=1)
    held_out = {case for kind in EDIT_KINDS for case in cases[kind].held_out}
    assert not held_out & set(written)
    assert all(case in cases[case[1].kind].seen for case in written)
    assert all(
        scene in singles.seen and apply_edit(scene, edit) in singles.seen + pairs.seen
        for scene, edit in written
    )
    tests = edit_test_cases(cases, per_kind=5, seed=0)
    assert set(tests) == {(k, s) for k in EDIT_KINDS for s in ("seen", "held_out")}
    for (kind, split), group in tests.items():
        assert len(group) == 5
        assert all(case in getattr(cases[kind], split) for case in group)


def test_scoring_a_generate_folder_true_results_and_copied_inputs(tmp_path, cases):
    """True drawings of each target, written as mtf-generate writes its samples, score 100%
    exactly right; the input images, scored as results, give the copy baseline (0% exactly
    right, 100% untouched) in every group."""
    tests = edit_test_cases(cases, per_kind=3, seed=0)
    flat = [(group, case) for group, group_cases in tests.items() for case in group_cases]
    inputs, prompts = write_edit_prompts([case for _, case in flat], tmp_path / "in", 32, 0)
    for path, prompt, (_, (scene, _)) in zip(inputs, prompts, flat, strict=True):
        tag = re.match(r"<image:([^>]+)> (\S.*)$", prompt)
        assert tag and Path(tag[1]) == path and path.is_absolute()
        assert score_image(read_image(path), scene)["all"]
    samples = tmp_path / "samples"
    samples.mkdir()
    for index, (_, (scene, edit)) in enumerate(flat):
        target = render(apply_edit(scene, edit), 32, random.Random(index))
        (samples / f"sample_{index:04d}_0.png").write_bytes(encode_png(target))
    records = [
        {"prompt": p, "output": f"<image:sample_{i:04d}_0.png>"} for i, p in enumerate(prompts)
    ]
    (samples / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    edited = score_edits(read_samples(samples, prompts), flat)
    copied = score_edits([read_image(path) for path in inputs], flat)
    groups = [(k, s) for k in EDIT_KINDS for s in ("seen", "held_out")]
    groups += [("overall", s) for s in ("seen", "held_out", "all")]
    for kind, split in groups:
        assert edited[kind][split] == {"exactly_right": 1.0, "untouched_preserved": 1.0}
        assert copied[kind][split] == {"exactly_right": 0.0, "untouched_preserved": 1.0}
    with pytest.raises(SystemExit, match="not of the"):
        read_samples(samples, prompts[::-1])


def _fake_base(root: Path) -> Path:
    """A learning-quality output directory as far as find_base reads it."""
    run = root / "quality" / lq.RUN_NAME
    checkpoint = layout.step_dir(layout.checkpoints_dir(run), 4000)
    checkpoint.mkdir(parents=True)
    layout.write_trainer_state(checkpoint, 4000, {})
    layout.latest_file(layout.checkpoints_dir(run)).write_text(checkpoint.name)
    shards = root / "quality" / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(
        json.dumps(
            {
                "kind": "image_caption",
                "tokenizer": {"path": "/data/tokenizer.json"},
                "vae": {"path": "/runs/quality/vae"},
                "image_size": 32,
            }
        )
    )
    sources = [
        {"kind": "text", "path": "data/builtin/text/train", "weight": 0.25, "name": "text"},
        {"kind": "image_caption", "path": str(shards), "weight": 0.75, "name": "images"},
    ]
    layout.run_config_file(run).write_text(yaml.safe_dump({"data": {"sources": sources}}))
    return root / "quality"


def test_the_fine_tuning_starts_from_the_base_run_and_mixes_its_data(tmp_path, monkeypatch):
    base = find_base(_fake_base(tmp_path))
    assert base == Base(
        layout.step_dir(layout.checkpoints_dir(tmp_path / "quality" / lq.RUN_NAME), 4000),
        "data/builtin/text/train",
        str(tmp_path / "quality" / "shards"),
        "/data/tokenizer.json",
        "/runs/quality/vae",
        32,
    )
    commands = []
    monkeypatch.setattr(lq, "_run", lambda command, log: commands.append(command) or 1.0)
    monkeypatch.setattr(editing, "_run", lambda command, log: commands.append(command) or 1.0)
    out = tmp_path / "editing"
    assert editing.shard_edits(out / "edits.parquet", out / "shards", base, out) == 2.0
    shard, merge = commands
    assert shard[1:4] == ["shard", "--kind", "image_edit"]
    flags = dict(zip(shard[4::2], shard[5::2], strict=True))
    assert flags == {
        "--inputs": str(out / "edits.parquet"),
        "--out": str(out / "shards"),
        "--tokenizer": "/data/tokenizer.json",
        "--vae": "/runs/quality/vae",
        "--image-size": "32",
    }
    assert merge[1:] == ["merge", "--out", str(out / "shards")]

    editing.fine_tune(out / "model", base, out / "shards", 300, ["data.sources.2.weight=0.5"])
    train = commands[-1]
    assert train[train.index("--config") + 1] == "tiny"
    overrides = dict(parse_override(a) for a in train if "=" in a)
    assert overrides["checkpoint.init_from"] == str(base.checkpoint)
    assert overrides["run.train_steps"] == 300 and overrides["run.name"] == "model"
    assert [(s["kind"], s["path"], s["weight"]) for s in overrides["data.sources"]] == [
        ("text", "data/builtin/text/train", editing.MIX["text"]),
        ("image_caption", str(tmp_path / "quality" / "shards"), editing.MIX["image_caption"]),
        ("image_edit", str(out / "shards"), editing.MIX["image_edit"]),
    ]
    assert train[-1] == "data.sources.2.weight=0.5"  # the user's overrides come last
    for setting in lq.OPTIMIZER_SETTINGS:
        assert setting in train


def _fake_tools(commands: list[list[str]]):
    """Stands in for the documented tools: records each command, makes what the next stage
    checks for, and mtf-generate "edits" by copying each prompt's input image."""

    def run(command: list[str], log: Path) -> float:
        commands.append(command)
        if command[0].endswith("mtf-generate"):
            out = Path(command[command.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            prompts = Path(command[command.index("--prompts-file") + 1]).read_text().splitlines()
            records = []
            for index, prompt in enumerate(prompts):
                given = re.match(r"<image:([^>]+)>", prompt)
                sample = out / f"sample_{index:04d}_0.png"
                if given:
                    sample.write_bytes(Path(given[1]).read_bytes())
                else:  # a caption: a blank image
                    Image.new("RGB", (32, 32), "white").save(sample)
                records.append(json.dumps({"prompt": prompt, "output": ""}) + "\n")
            (out / "samples.jsonl").write_text("".join(records))
        elif "merge" in command:
            Path(command[-1]).mkdir(parents=True, exist_ok=True)
            (Path(command[-1]) / "manifest.json").write_text("{}")
        elif "megatron_transfusion.train" in command:
            overrides = dict(parse_override(a) for a in command if "=" in a)
            run_dir = Path(overrides["run.output_root"]) / overrides["run.name"]
            lq.last_checkpoint(run_dir, overrides["run.train_steps"]).mkdir(parents=True)
        return 1.0

    return run


def test_the_stages_run_in_order_and_reuse_keeps_finished_ones(tmp_path, monkeypatch, capsys):
    """The whole command with its tools stubbed (a model that copies its input, draws blank
    images and writes empty captions): every stage in order, results.json with the copy
    baseline twice and what base and edited model retain, and --reuse runs only
    mtf-generate."""
    base = _fake_base(tmp_path)
    commands = []
    monkeypatch.setattr(lq, "_run", _fake_tools(commands))
    monkeypatch.setattr(editing, "_run", _fake_tools(commands))
    out = tmp_path / "editing"
    argv = ["--base", str(base), "--out", str(out), "--train-examples", "8", "--per-kind", "2"]
    editing.main([*argv, "--steps", "5", "--retained-per-kind", "2"])
    assert [c[1] if c[0].endswith("mtf-prepare-data") else Path(c[0]).name for c in commands] == [
        "shard",
        "merge",
        Path(sys.executable).name,
        *["mtf-generate"] * 5,  # the edits, then base and edited: text -> image, captions
    ]
    run = str(out / lq.RUN_NAME)
    drawn = [(c[1], c[c.index("--mode") + 1]) for c in commands[3:]]
    base_checkpoint = str(find_base(base).checkpoint)
    assert drawn == [(run, "image"), (base_checkpoint, "image"), (base_checkpoint, "text")] + [
        (run, "image"),
        (run, "text"),
    ]
    results = json.loads((out / "results.json").read_text())
    assert results["edited"] == results["copy_input"]
    assert results["edited"]["overall"]["all"] == {
        "exactly_right": 0.0,
        "untouched_preserved": 1.0,
    }
    kinds = ["seen", "held_out", "pairs_seen", "pairs_held_out"]
    for model in ("base", "edited"):  # blank images, empty captions: nothing right
        kept = results["retained"][model]
        assert kept["image_to_text"] == dict.fromkeys(kinds, 0.0)
        assert [kept["text_to_image"][kind]["all"] for kind in kinds] == [0.0] * 4
    assert set(results["timings_seconds"]) == {"data", "shard", "train", "generate", "retained"}
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split() == ["recolour", "seen", "0%", "100%", "|", "0%", "100%"]
    assert printed[-3].split() == ["pairs_seen", "0%", "0%", "0%", "0%"]
    assert len(printed) == 1 + 4 * 2 + 3 + 2 + 4 + 1

    commands.clear()
    argv += ["--retained-per-kind", "2"]
    editing.main([*argv, "--steps", "5", "--reuse"])
    assert [Path(c[0]).name for c in commands] == ["mtf-generate"] * 5
    editing.main([*argv, "--steps", "6", "--reuse"])  # another budget is another run
    assert [Path(c[0]).name for c in commands][5:] == [
        Path(sys.executable).name,
        *["mtf-generate"] * 5,
    ]
    with pytest.raises(SystemExit, match="not a finished learning-quality run"):
        editing.main(["--base", str(tmp_path / "nothing"), "--out", str(out)])
