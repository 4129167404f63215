"""Built-in data: the committed emoji render, the pydoc text corpus, and their export as
user-format inputs (tar shards, JSONL) with a disjoint held-out split."""

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
    builtin_text_documents,
    export_builtin_inputs,
    load_builtin_images,
    render_emoji,
    train_builtin_tokenizer,
)


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
                samples.setdefault(int(key), {})[ext] = value
    return samples


def test_export_images_round_trip_with_disjoint_heldout(emoji32, exported):
    images, captions = emoji32
    train, heldout = _read_tars(exported["images_train"]), _read_tars(exported["images_heldout"])
    assert len(exported["images_train"]) > 1
    assert not train.keys() & heldout.keys()
    assert sorted(train.keys() | heldout.keys()) == list(range(len(images)))
    assert 0.04 < len(heldout) / len(images) < 0.06
    for key, sample in {**train, **heldout}.items():
        assert sample["txt"] == captions[key]
        np.testing.assert_array_equal(sample["png"], images[key])


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
