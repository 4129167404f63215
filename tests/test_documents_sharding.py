"""Interleaved documents and image edits through the sharding job (one stored format),
then the loader: the documents in batches."""

import json
import tarfile
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_prep.builtin import builtin_text_documents
from data_prep.images import center_crop_resize, decode_image, to_model_range
from data_prep.readers import Columns
from data_prep.shard import ShardJob, main, merge, run_shard_job
from data_prep.tokenizer import train_bpe
from data_prep.vae import ConvVAE, VAEConfig, load_vae, save_vae
from kernels.attention import dense_mask
from megatron_transfusion.batch import GENERATED_IMAGE, GIVEN_IMAGE
from megatron_transfusion.config import load_config
from megatron_transfusion.data import MixedModalityLoader, PreparedDataset
from tests.data_fixtures import add_member, png_bytes

LATENT_SHAPE = (8, 4, 4)  # the test VAE at 32 px


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """Non-square, so centre-cropping matters; distinct, so a swapped image shows."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


IMAGES = [picture(40, 24, 0), picture(32, 32, 1), picture(36, 48, 2)]
# The document every input form holds: text, image, text, (blank text), image, image, text.
TEXTS = ["A cat sits on the mat.", None, " Then it jumps", "  ", None, None, "The end. "]
IMAGE_AT = {1: 0, 4: 1, 5: 2}  # part index -> IMAGES index


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("documents")
    tokenizer = train_bpe(builtin_text_documents()[:12], 400, root / "tok.json")
    torch.manual_seed(0)
    save_vae(ConvVAE(VAEConfig()), VAEConfig(), 0.5, root / "vae")
    return root, tokenizer, load_vae(root / "vae")


def job(env, kind, inputs, out, **kwargs):
    root = env[0]
    return ShardJob(
        kind=kind,
        inputs=[str(i) for i in inputs],
        out=str(out),
        tokenizer=str(root / "tok.json"),
        vae=str(root / "vae"),
        image_size=32,
        **kwargs,
    )


def samples(directory):
    dataset = PreparedDataset(str(directory))
    return [dataset[i] for i in range(len(dataset))]


def encoded(vae, images):
    """What the sharding job should store: each image centre-cropped and encoded alone."""
    pixels = [center_crop_resize(decode_image(png_bytes(image)), 32) for image in images]
    return vae.encode(to_model_range(np.stack(pixels))).numpy()


def assert_latents(stored, vae, images):
    # fp16 storage; batch composition changes conv summation order by an ulp or so
    assert stored.shape == (len(images), *LATENT_SHAPE)
    np.testing.assert_allclose(stored.astype(np.float32), encoded(vae, images), atol=2e-3)


def tar_of(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)


def rejections(out):
    records = map(json.loads, (out / "rejected.jsonl").open())
    return {r["key"]: r for r in records}


@pytest.fixture(scope="module")
def interleaved(env):
    """The document from Parquet (image bytes), JSONL (image paths, relative and absolute)
    and a tar (parts added out of order, indices that sort wrongly as strings); the Parquet
    adds a text-only document, the JSONL an image-only one."""
    root = env[0]
    inputs = root / "interleaved"
    (inputs / "pictures").mkdir(parents=True)
    pngs = [png_bytes(image) for image in IMAGES]
    images = [pngs[IMAGE_AT[i]] if i in IMAGE_AT else None for i in range(len(TEXTS))]
    pq.write_table(
        pa.table({"texts": [TEXTS, ["Only words here."]], "images": [images, [None]]}),
        inputs / "docs.parquet",
    )
    paths = []
    for i, data in enumerate(pngs):
        (inputs / "pictures" / f"{i}.png").write_bytes(data)
        paths.append(f"pictures/{i}.png" if i else str(inputs / "pictures" / f"{i}.png"))
    lines = [
        {
            "texts": TEXTS,
            "images": [paths[IMAGE_AT[i]] if i in IMAGE_AT else None for i in range(7)],
        },
        {"texts": [None], "images": ["pictures/1.png"]},
    ]
    (inputs / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    indices = [0, 1, 2, 3, 9, 10, 11]  # as strings 10 and 11 would sort before 2
    members = []
    for i, text in enumerate(TEXTS):
        if text is not None:
            members.append((f"doc.{indices[i]}.txt", text.encode()))
        else:
            members.append((f"doc.{indices[i]}.png", pngs[IMAGE_AT[i]]))
    members.append(("doc.json", b'{"url": "metadata, not a part"}'))
    tar_of(inputs / "docs.tar", members[::-1])
    out = root / "interleaved-out"
    counts = run_shard_job(job(env, "interleaved", [inputs], out, batch_size=2))
    return out, counts, merge(out)


def test_interleaved_document_round_trips_from_every_input_form(env, interleaved):
    _, tokenizer, vae = env
    out, _, manifest = interleaved
    got = samples(out)
    keys = ["docs.jsonl:1", "docs.jsonl:2", "docs.parquet/0", "docs.parquet/1", "docs.tar/doc"]
    assert [s["key"] for s in got] == keys
    texts = [tokenizer.encode(t.strip()) for t in TEXTS if t is not None and t.strip()]
    parts = [len(texts[0]), GENERATED_IMAGE, len(texts[1]), GENERATED_IMAGE, GENERATED_IMAGE]
    parts.append(len(texts[2]))
    for sample in (got[0], got[2], got[4]):
        assert sample["tokens"].tolist() == sum(texts, [])
        assert sample["parts"].tolist() == parts
        assert_latents(sample["latents"], vae, IMAGES)
    image_only, text_only = got[1], got[3]
    assert image_only["parts"].tolist() == [GENERATED_IMAGE]
    assert image_only["tokens"].shape == (0,)
    assert_latents(image_only["latents"], vae, IMAGES[1:2])
    assert text_only["tokens"].tolist() == tokenizer.encode("Only words here.")
    assert text_only["parts"].tolist() == [len(text_only["tokens"])]
    assert text_only["latents"].shape == (0, *LATENT_SHAPE)
    assert manifest["kind"] == "interleaved" and manifest["latent_shape"] == list(LATENT_SHAPE)
    assert "max_caption_tokens" not in manifest
    assert manifest["counts"]["written"] == 5 and manifest["counts"]["images_written"] == 10
    assert not any(name.startswith("rejected_") for name in manifest["counts"])


def test_part_files_and_lengths_match_the_samples(interleaved):
    out, _, manifest = interleaved
    got = samples(out)
    part_list, offsets = np.load(out / "parts.npy"), np.load(out / "part_offsets.npy")
    assert part_list.dtype == np.int32 and offsets.dtype == np.int64
    assert offsets.tolist() == np.cumsum([0] + [len(s["parts"]) for s in got]).tolist()
    for i, sample in enumerate(got):
        assert part_list[offsets[i] : offsets[i + 1]].tolist() == sample["parts"].tolist()
    assert np.load(out / "lengths.npy").tolist() == [len(s["tokens"]) for s in got]
    assert manifest["num_tokens"] == sum(len(s["tokens"]) for s in got)
    assert {"parts.npy", "part_offsets.npy", "lengths.npy"} <= set(manifest["files"])


def test_job_array_units_merge_their_parts_in_unit_order(env, interleaved, tmp_path):
    _, _, single_manifest = interleaved
    inputs = env[0] / "interleaved"
    one_task = job(env, "interleaved", [inputs], tmp_path, batch_size=2, num_shards=2)
    for task in range(2):
        run_shard_job(replace(one_task, shard_index=task))
    manifest = merge(tmp_path)
    for name in ("parts.npy", "part_offsets.npy", "lengths.npy"):
        assert manifest["files"][name] == single_manifest["files"][name], name


def test_a_bad_image_drops_its_whole_document(env, tmp_path):
    """Counted once under the image's reason, with the failing part named; the documents
    around it and their images are kept."""
    good, bad = png_bytes(IMAGES[0]), b"not an image at all"
    (tmp_path / "in").mkdir()
    table = {
        "texts": [["before", None, "between", None, "after"], ["fine", None]],
        "images": [[None, good, None, bad, None], [None, good]],
    }
    pq.write_table(pa.table(table), tmp_path / "in" / "a.parquet")
    lines = [
        {"texts": ["see", None], "images": [None, "https://example.com/cat.jpg"]},
        {"texts": ["see", None], "images": [None, "nowhere/cat.png"]},
        {"texts": ["see", None], "images": [None, ""]},
        {"texts": ["both", None], "images": ["pictures/x.png", None]},
        {"texts": ["a", "b"], "images": [None]},
        {"texts": [7], "images": [None]},
        {"texts": ["  ", None], "images": [None, None]},
        {"texts": ["  "], "images": [None]},
    ]
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    small = png_bytes(picture(8, 40, 3))
    tar_of(
        tmp_path / "in" / "c.tar",
        [
            ("ok.0.txt", b"kept"),
            ("ok.1.png", good),
            ("word.zero.txt", b"not a number"),
            ("twice.1.txt", b"one"),
            ("twice.1.png", good),
            ("tiny.0.txt", b"small"),
            ("tiny.1.png", small),
        ],
    )
    out = tmp_path / "out"
    counts = run_shard_job(job(env, "interleaved", [tmp_path / "in"], out))
    assert counts["written"] == 2 and counts["images_written"] == 2
    expected = {
        "rejected_undecodable_image": 1,
        "rejected_image_url": 1,
        "rejected_unreadable_image": 1,
        "rejected_missing_image": 2,  # "" where an image is due; neither text nor image
        "rejected_bad_parts": 2,  # both at one index; lists of different lengths
        "rejected_not_a_string": 1,
        "rejected_empty_document": 1,
        "rejected_bad_part_index": 2,
        "rejected_image_too_small": 1,
    }
    assert {k: v for k, v in counts.items() if k.startswith("rejected_")} == expected
    merge(out)
    found = {key: (r["reason"], r.get("part")) for key, r in rejections(out).items()}
    assert found["a.parquet/0"] == ("undecodable_image", 3)
    assert found["b.jsonl:1"] == ("image_url", 1)
    assert found["b.jsonl:4"] == ("bad_parts", 0)
    assert found["c.tar/twice"] == ("bad_part_index", 1)
    assert found["c.tar/tiny"] == ("image_too_small", 1)
    details = {key: r["detail"] for key, r in rejections(out).items()}
    assert "download the images first (e.g. with img2dataset)" in details["b.jsonl:1"]
    assert "nowhere/cat.png" in details["b.jsonl:2"]
    assert details["b.jsonl:6"] == "'texts' is a int"
    assert details["c.tar/word"].startswith("member 'KEY.zero.txt'")
    assert [s["key"] for s in samples(out)] == ["a.parquet/1", "c.tar/ok"]


EDITS = [("make it blue", IMAGES[0], IMAGES[1]), ("add a hat", IMAGES[2], IMAGES[0])]


def test_image_edits_from_every_input_form(env, tmp_path):
    """parts are (given input image, instruction, generated output image) everywhere; the
    Parquet's input images are Hugging Face {bytes, path} dicts."""
    _, tokenizer, vae = env
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table(
            {
                "before": [{"bytes": png_bytes(e[1]), "path": None} for e in EDITS],
                "ask": [e[0] for e in EDITS],
                "after": [png_bytes(e[2]) for e in EDITS],
            }
        ),
        tmp_path / "in" / "a.parquet",
    )
    for i, image in enumerate(IMAGES):
        (tmp_path / "in" / f"{i}.png").write_bytes(png_bytes(image))
    lines = [
        {"before": "0.png", "ask": "make it blue", "after": "1.png"},
        {"before": "2.png", "ask": "  ", "after": "0.png"},
        {"before": "2.png", "ask": "add a hat", "after": None},
    ]
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    members = []
    for key, (instruction, before, after) in zip(("e0", "e1"), EDITS):
        members += [(f"{key}.txt", instruction.encode()), (f"{key}.input.png", png_bytes(before))]
        members.append((f"{key}.output.png", png_bytes(after)))
    members.append(("lost.input.png", png_bytes(IMAGES[0])))
    members.append(("lost.txt", b"no output"))
    tar_of(tmp_path / "in" / "c.tar", members)
    out = tmp_path / "out"
    columns = Columns(input_image="before", instruction="ask", output_image="after")
    counts = run_shard_job(job(env, "image_edit", [tmp_path / "in"], out, columns=columns))
    assert counts["rejected_missing_instruction"] == 1 and counts["rejected_missing_image"] == 2
    manifest = merge(out)
    assert manifest["kind"] == "image_edit" and manifest["counts"]["images_written"] == 10
    got = samples(out)
    keys = ["a.parquet/0", "a.parquet/1", "b.jsonl:1", "c.tar/e0", "c.tar/e1"]
    assert [s["key"] for s in got] == keys
    expected = [EDITS[0], EDITS[1], EDITS[0], EDITS[0], EDITS[1]]
    for sample, (instruction, before, after) in zip(got, expected):
        ids = tokenizer.encode(instruction)
        assert sample["parts"].tolist() == [GIVEN_IMAGE, len(ids), GENERATED_IMAGE]
        assert sample["tokens"].tolist() == ids
        assert_latents(sample["latents"], vae, [before, after])
    found = {key: (r["reason"], r.get("part")) for key, r in rejections(out).items()}
    assert found == {
        "b.jsonl:2": ("missing_instruction", 1),
        "b.jsonl:3": ("missing_image", 2),
        "c.tar/lost": ("missing_image", 2),
    }
    # In the loader's rows: BOS, the input image (given: clean, no loss; image-first), the
    # instruction, the edited image (generated, over every noise level), EOS.
    cfg = load_config(
        "tiny",
        [
            f"data.sources=[{{kind: image_edit, path: {out}}}]",
            "data.seq_length=128",
            "data.micro_batch_size=1",
            "data.global_batch_tokens=128",
            "model.vocab_size=512",
            "model.max_sequence_length=128",
        ],
    )
    loader = MixedModalityLoader(cfg)
    (batch,) = loader.next_step()
    special, row = loader.special, batch.tokens[0]
    assert row[0] == special.bos and row[1] == special.boi and batch.num_images >= 2
    assert batch.given.tolist() == [True, False] * (batch.num_images // 2)
    assert batch.caption_first.tolist() == [False, True] * (batch.num_images // 2)


def shard_cli(env, tmp_path, *args):
    root = env[0]
    common = ["--out", str(tmp_path / "o"), "--tokenizer", str(root / "tok.json")]
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", *common, *args])
    message = str(exit_info.value)
    assert "\n" not in message
    return message


def test_cli_errors_are_one_line(env, interleaved, tmp_path):
    inputs = str(env[0] / "interleaved" / "docs.parquet")
    vae = ["--vae", str(env[0] / "vae"), "--image-size", "32"]
    message = shard_cli(env, tmp_path, "--kind", "interleaved", "--inputs", inputs)
    assert message == "error: --vae is required for interleaved data"
    message = shard_cli(
        env, tmp_path, "--kind", "interleaved", "--inputs", inputs, *vae, "--texts-column", "body"
    )
    assert "has no column(s) ['body'] (columns: ['texts', 'images'])" in message
    jsonl = str(env[0] / "interleaved" / "docs.jsonl")
    message = shard_cli(env, tmp_path / "j", "--kind", "image_edit", "--inputs", jsonl, *vae)
    assert "missing_column 'input_image' (the record has: texts, images)" in message


# ---- sharding -> loader -> batch ------------------------------------------------------------


def interleaved_loader(out, seq_length):
    cfg = load_config(
        "tiny",
        [
            f"data.sources=[{{name: docs, kind: interleaved, path: {out}}}]",
            f"data.seq_length={seq_length}",
            "data.micro_batch_size=1",
            f"data.global_batch_tokens={seq_length}",
            "model.vocab_size=512",
            f"model.max_sequence_length={seq_length}",
        ],
    )
    return MixedModalityLoader(cfg), cfg


def expected_layout(tokenizer, special, patches):
    """The three-image document as the paper lays it out, from the raw inputs."""
    out = [special.bos]
    for text in TEXTS:
        if text is None:
            out += [special.boi, *["image"] * patches, special.eoi]
        elif text.strip():
            out += tokenizer.encode(text.strip())
    return out + [special.eos]


def test_a_three_image_document_round_trips_into_a_batch(env, interleaved):
    """Sharded from Parquet/JSONL/tar, planned, read and packed: its row holds the
    document exactly (tokens, images as BOI patches EOI, positions from 0), its latents
    are the VAE's encodings of the input images in order, and the mask is the brute-force
    one: causal, each image bidirectional inside itself, nothing across documents."""
    _, tokenizer, vae = env
    out = interleaved[0]
    loader, cfg = interleaved_loader(out, 128)
    patches = cfg.model.patches_per_image
    want = expected_layout(tokenizer, loader.special, patches)
    found, documents = 0, 0
    while documents < 5:  # one epoch: five documents, each fits a 128-position row
        (batch,) = loader.next_step()
        batch.validate(patches)
        mask = dense_mask(batch)[0, 0]
        for d in batch.document_ids[0].unique().tolist():
            documents += d >= 0
            if d < 0 or documents > 5:
                continue
            where = (batch.document_ids[0] == d).nonzero().flatten()
            start, stop = int(where[0]), int(where[-1]) + 1
            image_ids = batch.image_ids[0, start:stop]
            got = [
                "image" if i >= 0 else int(t)
                for t, i in zip(batch.tokens[0, start:stop], image_ids)
            ]
            if got != want:
                continue
            found += 1
            assert batch.positions[0, start:stop].tolist() == list(range(stop - start))
            images = image_ids[image_ids >= 0].unique()
            np.testing.assert_allclose(
                batch.latents[images].numpy(), encoded(vae, IMAGES), atol=2e-3
            )
            assert batch.caption_first[images].all() and not batch.given[images].any()
        # Brute force over the whole row, position by position.
        docs, imgs = batch.document_ids[0].tolist(), batch.image_ids[0].tolist()
        n = len(docs)
        reference = torch.tensor(
            [
                [
                    docs[q] >= 0
                    and docs[q] == docs[k]
                    and (k <= q or (imgs[q] >= 0 and imgs[q] == imgs[k]))
                    for k in range(n)
                ]
                for q in range(n)
            ]
        )
        padding = batch.document_ids[0] < 0
        assert torch.equal(mask[~padding], reference[~padding])
    assert found == 3  # from Parquet, JSONL and the tar


def test_a_document_longer_than_a_row_is_cut_only_at_text(env, interleaved):
    """At 40 positions (an image takes 18) the document spreads over rows: every image
    whole in exactly one window, the windows' text the document's."""
    _, tokenizer, _ = env
    loader, cfg = interleaved_loader(interleaved[0], 40)
    patches = cfg.model.patches_per_image
    want = expected_layout(tokenizer, loader.special, patches)
    windows = []
    while loader.sampler.cursors["docs"].epoch < 2:  # all of the first epoch in rows
        (batch,) = loader.next_step()
        for d in batch.document_ids[0].unique().tolist():
            where = (batch.document_ids[0] == d).nonzero().flatten()
            if d >= 0:
                ids = batch.image_ids[0, where]
                windows.append(
                    ["image" if i >= 0 else int(t) for t, i in zip(batch.tokens[0, where], ids)]
                )
    # Reassemble the tar's document from its windows (each starts on the last position of
    # the one before) and find it among the reassembled ones.
    documents, current = [], None
    for window in windows:
        if window[0] == loader.special.bos:
            current = list(window)
            documents.append(current)
        else:
            assert window[0] == current[-1]
            current += window[1:]
        assert len(window) <= 40
    assert documents[:5].count(want) == 3  # the first epoch's five documents
