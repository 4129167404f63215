"""Built-in data: the committed emoji render, the shapes scenes drawn in code, the pydoc text
corpus, and their export as user-format inputs (tar shards, JSONL) with a disjoint held-out
split."""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from data_prep import builtin
from data_prep.builtin import (
    builtin_shapes,
    builtin_text_documents,
    export_builtin_inputs,
    load_builtin_images,
    render_emoji,
    shapes_scenes,
    train_builtin_tokenizer,
)
from data_prep.shapes import parse_caption, score_image


@pytest.fixture(scope="module")
def emoji32():
    return load_builtin_images()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_builtin_inputs(tmp_path_factory.mktemp("builtin"))


def test_committed_emoji_load_without_font_or_emoji_package(monkeypatch):
    def no_font(*args, **kwargs):
        raise OSError("no fonts here")

    monkeypatch.setattr(ImageFont, "truetype", no_font)
    monkeypatch.setitem(sys.modules, "emoji", None)  # any `import emoji` now fails
    images, captions = load_builtin_images()
    assert len(images) == len(captions) > 3000


def test_emoji_images_and_captions(emoji32):
    images, captions = emoji32
    n = len(images)
    assert images.dtype == np.uint8 and images.shape == (n, 32, 32, 3)
    assert all(c.strip() == c and c for c in captions) and len(set(captions)) == n
    flat = images.reshape(n, -1)
    assert (flat.std(axis=1) > 5).all()  # no blank renders
    assert (images[:, 0, 0] == 255).all()  # white background
    assert len(np.unique(flat, axis=0)) > 0.99 * n
    # Captions belong to their images.
    grin = images[captions.index("grinning face")][12:20, 12:20].reshape(-1, 3).mean(0)
    assert grin[0] > 200 and grin[1] > 170 and grin[2] < 120  # yellow
    france = images[captions.index("flag of france")][16].astype(int)
    assert france[6, 2] > france[6, 0] + 100 and france[25, 0] > france[25, 2] + 100  # blue | red
    heart = images[captions.index("red heart")][14:18, 14:18].reshape(-1, 3).mean(0)
    assert heart[0] > 200 and heart[1] < 100
    for caption in ["flag of england", "keycap 1", "thumbs up", "cat face"]:
        assert caption in captions


@pytest.mark.slow
def test_render_reproduces_committed_file(emoji32):
    if not Path(builtin.NOTO_EMOJI_FONT).is_file():
        pytest.skip("apt-get install fonts-noto-color-emoji")
    pytest.importorskip("emoji")
    images, captions = render_emoji(32)
    assert captions == emoji32[1]
    assert np.abs(images.astype(int) - emoji32[0]).mean() < 1


def test_render_without_font_says_what_to_install(tmp_path):
    pytest.importorskip("emoji")
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        render_emoji(font_path=tmp_path / "missing.ttf")


def test_text_documents_are_deterministic_and_substantial():
    docs = builtin_text_documents()
    assert docs == builtin_text_documents()
    assert sum(map(len, docs)) > 300_000 and len(docs) > 100
    assert all(d.strip() for d in docs)
    assert np.median([len(d) for d in docs]) >= builtin.MIN_DOC_CHARS
    assert len(set(docs)) == len(docs)
    assert any('The "assert" statement' in d for d in docs)


def _read_tars(paths):
    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            members = tar.getnames()
            assert len(members) <= 2 * builtin.SAMPLES_PER_SHARD
            for name in members:
                key, ext = name.split(".")
                data = tar.extractfile(name).read()
                value = np.asarray(Image.open(io.BytesIO(data))) if ext == "png" else data.decode()
                samples.setdefault(key, {})[ext] = value
    return samples


@pytest.fixture(scope="module")
def exported_images(exported):
    """{split: {"emoji": {row: sample}, "shapes": {key: sample}}} read back from the tars."""
    parts = {}
    for split in ("train", "heldout"):
        samples = _read_tars(exported[f"images_{split}"])
        emoji = {int(k): v for k, v in samples.items() if k.isdigit()}
        shapes = {k: v for k, v in samples.items() if k.startswith("shapes")}
        assert len(emoji) + len(shapes) == len(samples)
        parts[split] = {"emoji": emoji, "shapes": shapes}
    return parts


def test_export_images_round_trip_with_disjoint_heldout(emoji32, exported, exported_images):
    images, captions = emoji32
    train, heldout = exported_images["train"]["emoji"], exported_images["heldout"]["emoji"]
    assert len(exported["images_train"]) > 1
    assert not train.keys() & heldout.keys()
    assert sorted(train.keys() | heldout.keys()) == list(range(len(images)))
    assert 0.04 < len(heldout) / len(images) < 0.06
    for key, sample in {**train, **heldout}.items():
        assert sample["txt"] == captions[key]
        np.testing.assert_array_equal(sample["png"], images[key])


def test_export_has_the_shapes_part_with_unseen_combinations_held_out(exported_images):
    """The tars hold the shapes scenes next to the emoji; every caption parses back to a scene
    of its split, the held-out scenes never occur in training, and the pictures show what
    their captions say."""
    scenes = shapes_scenes()
    found = {}
    for split in ("train", "heldout"):
        samples = exported_images[split]["shapes"]
        assert len(samples) == builtin.SHAPES_SAMPLES[split]
        found[split] = [parse_caption(sample["txt"]) for sample in samples.values()]
        assert None not in found[split]
        assert set(found[split]) <= set(scenes[split]["single"] + scenes[split]["pair"])
        pairs = sum(len(scene.things) == 2 for scene in found[split])
        assert 0.35 < pairs / len(samples) < 0.65
        for key, sample in list(samples.items())[:: len(samples) // 40]:  # the scorer is slow
            result = score_image(sample["png"], parse_caption(sample["txt"]))
            assert result["all"], (key, sample["txt"], result)
    assert not set(found["train"]) & set(found["heldout"])
    assert len(set(found["train"])) > 140 and len(set(found["heldout"])) > 25  # (nearly) all scenes
    captions = [s["txt"] for s in exported_images["train"]["shapes"].values()]
    for relation in ("to the left of", "to the right of"):  # both orders of a pair's caption
        assert any(relation in c for c in captions)
    keys = [k for split in exported_images.values() for k in split["shapes"]]
    assert len(set(keys)) == len(keys)  # unique across splits


def test_shapes_part_is_drawn_the_same_every_time():
    first, second = builtin_shapes("heldout"), builtin_shapes("heldout")
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]


def test_export_text_round_trip_with_disjoint_heldout(exported):
    def read(paths):
        return [json.loads(line)["text"] for p in paths for line in open(p, encoding="utf-8")]

    docs = builtin_text_documents()
    train, heldout = read(exported["text_train"]), read(exported["text_heldout"])
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(docs)
    assert 0.04 < len(heldout) / len(docs) < 0.06
    names = [p.name for paths in exported.values() for p in paths]
    assert len(set(names)) == len(names)  # unique across splits: sample keys include the name


def test_builtin_tokenizer(tmp_path, emoji32):
    tok = train_builtin_tokenizer(tmp_path / "tokenizer.json")
    assert tok.vocab_size == 4096 and tok.special.boi == 3
    docs = builtin_text_documents()
    for text in [docs[0], emoji32[1][0], "flag of france"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(docs[0]) / len(tok.encode(docs[0])) > 3.5  # it learned real merges
    # The shapes captions are in its training text: one token per word, also for held-out scenes.
    for scene in shapes_scenes()["heldout"]["pair"][:3] + shapes_scenes()["heldout"]["single"][:3]:
        caption = scene.caption()
        assert len(tok.encode(caption)) == len(caption.split()), caption
