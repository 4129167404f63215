"""The offline sharding job: inputs -> MDS shards with a manifest, split/resume/merge."""

import json
import shutil
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from data_prep.images import center_crop_resize, decode_image, to_model_range
from data_prep.shard import ShardJob, merge, run_shard_job
from data_prep.tokenizer import train_bpe
from data_prep.vae import ConvVAE, VAEConfig, load_vae, save_vae
from megatron_transfusion.data import CorruptShardError, PreparedDataset
from tests.data_fixtures import png_bytes, write_inputs

COLUMNS = dict(image="picture", caption="caption", text="body")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    source = write_inputs(root / "inputs")
    tokenizer = train_bpe(source["documents"] + source["captions"][:500], 400, root / "tok.json")
    torch.manual_seed(0)
    save_vae(ConvVAE(VAEConfig()), VAEConfig(), 0.5, root / "vae")
    return root, source, tokenizer


def job(env, kind, out, inputs=None, caption_column="caption", **kwargs):
    from data_prep.readers import Columns

    root = env[0]
    default = root / "inputs" / ("images" if kind == "image_caption" else "text")
    inputs = [str(root / "inputs" / i) for i in inputs] if inputs else [str(default)]
    return ShardJob(
        kind=kind,
        inputs=inputs,
        out=str(out),
        tokenizer=str(root / "tok.json"),
        vae=str(root / "vae"),
        image_size=32,
        columns=Columns("picture", caption_column, "body"),
        **kwargs,
    )


TARS = ["images/part-0.tar", "images/part-1.tar"]


def samples(directory):
    dataset = PreparedDataset(str(directory))
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def text_shards(env):
    out = env[0] / "text-single"
    counts = run_shard_job(job(env, "text", out))
    return out, counts, merge(out)


def test_text_round_trip_keeps_documents_whole(env, text_shards):
    """However long: the loader cuts them to the row length it trains at."""
    _, source, tokenizer = env
    out, _, manifest = text_shards
    # jsonl first, then parquet: sorted unit order
    expected = [tokenizer.encode(document) for document in source["documents"]]
    assert max(map(len, expected)) > 256  # longer than the tiny preset's rows
    got = samples(out)
    assert [s["tokens"].tolist() for s in got] == expected
    assert manifest["num_samples"] == len(expected)
    assert np.load(out / "lengths.npy").tolist() == [len(e) for e in expected]
    assert manifest["tokenizer"]["sha256"] == tokenizer.fingerprint()["sha256"]


def test_bad_text_inputs_are_counted_and_named(text_shards):
    out, counts, manifest = text_shards
    assert counts["rejected_empty_text"] == 1 and counts["rejected_bad_json"] == 1
    assert counts["rejected_not_utf8"] == 1
    assert manifest["counts"]["rejected_not_utf8"] == 1
    keys = {json.loads(line)["key"] for line in (out / "rejected.jsonl").read_text().splitlines()}
    assert keys == {"docs.jsonl:7", "docs.jsonl:8", "docs.jsonl:9"}


def test_rejections_say_what_was_wrong(env, tmp_path):
    """Not lumped together as empty text: each reason names the problem, and the first record
    of each is listed with it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [
        '{"body": "a fine document"}',
        '{"text": "the wrong field"}',
        '["not", "an", "object"]',
        '{"body": 42}',
        '{"body": null}',
        '{"body": "  "}',
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"body": [7, 8]}), tmp_path / "in" / "numbers.parquet")
    out = tmp_path / "out"
    counts = run_shard_job(replace(job(env, "text", out), inputs=[str(tmp_path / "in")]))
    assert counts["written"] == 1
    assert counts["rejected_missing_column"] == 1 and counts["rejected_not_an_object"] == 1
    assert counts["rejected_not_a_string"] == 3 and counts["rejected_empty_text"] == 2
    rejected = map(json.loads, (out / "unit-000000" / "rejected.jsonl").open())
    details = {(r["key"], r["reason"]): r["detail"] for r in rejected}
    assert details[("docs.jsonl:2", "missing_column")] == "'body' (the record has: text)"
    assert details[("docs.jsonl:3", "not_an_object")] == "a JSON list, expected an object"
    assert details[("docs.jsonl:4", "not_a_string")] == "'body' is a int"


def test_tar_captions_and_tiny_images_are_rejected_by_name(env, tmp_path):
    """A caption .json without the caption field or not an object, and images whose shorter
    side is under half the training size (32 px here: 16 px is the least accepted)."""
    from tests.data_fixtures import add_member

    images = {
        "ok": np.zeros((16, 40, 3), np.uint8),
        "dot": np.zeros((1, 1, 3), np.uint8),
        "thin": np.zeros((15, 64, 3), np.uint8),
        "field": np.zeros((32, 32, 3), np.uint8),
        "list": np.zeros((32, 32, 3), np.uint8),
    }
    captions = {"field": {"alt": "x"}, "list": ["x"]}
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "t.tar", "w") as tar:
        for key, image in images.items():
            add_member(tar, f"{key}.png", png_bytes(image))
            caption = captions.get(key, {"caption": "a dot"})
            add_member(tar, f"{key}.json", json.dumps(caption).encode())
    out = tmp_path / "out"
    tar_job = replace(job(env, "image_caption", out), inputs=[str(tmp_path / "in" / "t.tar")])
    counts = run_shard_job(tar_job)
    assert counts["written"] == 1 and counts["rejected_image_too_small"] == 2
    assert counts["rejected_missing_column"] == 1 and counts["rejected_not_an_object"] == 1
    rejected = map(json.loads, (out / "unit-000000" / "rejected.jsonl").open())
    details = {r["key"]: r["detail"] for r in rejected}
    assert details["t.tar/dot"].startswith("1×1 px; the shorter side must be ≥ 16 px")
    assert details["t.tar/field"] == "'caption' (the record has: alt)"


def test_a_job_that_rejects_every_record_fails_with_the_top_reason(env, tmp_path):
    """A wrong --text-column: the shard task and the merge exit non-zero, in one line each."""
    from data_prep.shard import main

    root = env[0]
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as shard_exit:
        main(
            [
                "shard",
                "--kind",
                "text",
                "--inputs",
                str(root / "inputs" / "text" / "docs.jsonl"),
                "--out",
                str(out),
                "--tokenizer",
                str(root / "tok.json"),
                "--text-column",
                "text",
            ]
        )
    message = str(shard_exit.value)
    assert message.startswith(
        "error: every record of the 1 input unit was rejected: missing_column 'text' "
        "(the record has: body) (7 of 9 rejected; first: docs.jsonl:1 in "
    )
    assert "\n" not in message
    with pytest.raises(SystemExit, match="^error: '.*o' holds no samples: missing_column 'text'"):
        main(["merge", "--out", str(out)])
    assert not (out / "manifest.json").exists()


def test_image_caption_round_trip_equals_direct_encoding(env, tmp_path):
    root, source, tokenizer = env
    out = tmp_path / "img"
    run_shard_job(job(env, "image_caption", out, inputs=TARS))
    manifest = merge(out)
    got = samples(out)
    vae = load_vae(root / "vae")
    assert [s["key"] for s in got] == [f"part-{i // 20}.tar/{i:06d}" for i in range(40)]
    for i, sample in enumerate(got):
        assert sample["caption"].tolist() == tokenizer.encode(source["captions"][i])
        pixels = center_crop_resize(decode_image(png_bytes(source["images"][i])), 32)
        direct = vae.encode(to_model_range(pixels[None])).numpy()[0]
        # fp16 storage; batch composition changes conv summation order by an ulp or so
        np.testing.assert_allclose(
            sample["latent"].astype(np.float32), direct, atol=2e-3, rtol=2e-3
        )
    assert manifest["latent_shape"] == [8, 4, 4] and manifest["image_size"] == 32
    assert manifest["vae"]["sha256"] == vae.fingerprint()["sha256"]
    counts = manifest["counts"]
    assert counts["rejected_undecodable_image"] == 1
    assert counts["rejected_missing_caption"] >= 1  # "no-caption.png"
    assert counts["rejected_not_utf8"] == 1
    rejected = (out / "rejected.jsonl").read_text()
    assert "part-0.tar/bad-image" in rejected and "part-0.tar/no-caption" in rejected


def test_parquet_columns_are_configurable(env, tmp_path):
    parquet = ["images/part-2.parquet"]
    with pytest.raises(ValueError, match="has no column.*'caption'"):
        run_shard_job(job(env, "image_caption", tmp_path / "a", inputs=parquet))
    counts = run_shard_job(
        job(env, "image_caption", tmp_path / "b", inputs=parquet, caption_column="alt")
    )
    assert counts["written"] == 20 and counts["rejected_missing_caption"] == 1


def test_image_folder_shards_like_the_equivalent_tar(env, tmp_path):
    """part-0.tar unpacked into a folder (KEY.png + KEY.txt/json, the bad samples too) gives the
    same samples, latents and rejections; found as a folder of images under a named directory."""
    root = env[0]
    folder = tmp_path / "photos" / "part-0"
    folder.mkdir(parents=True)
    with tarfile.open(root / "inputs" / "images" / "part-0.tar") as tar:
        for member in tar:
            (folder / member.name).write_bytes(tar.extractfile(member).read())
    from_tar = run_shard_job(job(env, "image_caption", tmp_path / "tar", inputs=TARS[:1]))
    folder_job = job(env, "image_caption", tmp_path / "folder")
    from_folder = run_shard_job(replace(folder_job, inputs=[str(tmp_path / "photos")]))
    assert from_folder == from_tar and from_tar["written"] == 20
    for out in ("tar", "folder"):
        merge(tmp_path / out)
    tar_samples, folder_samples = samples(tmp_path / "tar"), samples(tmp_path / "folder")
    assert [s["key"] for s in folder_samples] == [f"part-0/{i:06d}" for i in range(20)]
    assert [s["key"] for s in tar_samples] == [f"part-0.tar/{i:06d}" for i in range(20)]
    for a, b in zip(tar_samples, folder_samples):
        np.testing.assert_array_equal(a["caption"], b["caption"])
        np.testing.assert_array_equal(a["latent"], b["latent"])
    rejected = {json.loads(line)["key"] for line in (tmp_path / "folder" / "rejected.jsonl").open()}
    assert rejected == {"part-0/bad-image", "part-0/no-caption", "part-0/latin1"}


def test_job_array_plus_merge_equals_single_job(env, text_shards, tmp_path):
    single_out, _, single = text_shards
    out = tmp_path / "array"
    for task in range(3):
        run_shard_job(job(env, "text", out, shard_index=task, num_shards=3))
    merged = merge(out)
    assert merged["files"] == single["files"], "byte-identical shards"
    assert [s["tokens"].tolist() for s in samples(out)] == [
        s["tokens"].tolist() for s in samples(single_out)
    ]


def test_killed_task_leaves_no_complete_looking_unit_and_rerun_finishes(
    env, text_shards, tmp_path, monkeypatch
):
    import data_prep.shard as shard

    _, _, single = text_shards
    out = tmp_path / "killed"
    original = shard._process_text

    def dies_midway(path, *args):
        if path.suffix == ".parquet":
            raise KeyboardInterrupt("killed")  # after writing part of the unit
        return original(path, *args)

    monkeypatch.setattr(shard, "_process_text", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run_shard_job(job(env, "text", out))
    assert (out / "unit-000000").is_dir() and not (out / "unit-000001").exists()
    assert list(out.glob(".tmp-unit-000001-*")), "the half-written unit stays a temp dir"
    with pytest.raises(RuntimeError, match="1 of 2 units are not finished"):
        merge(out)
    monkeypatch.setattr(shard, "_process_text", original)
    counts = run_shard_job(job(env, "text", out))
    assert counts["units_already_done"] == 1 and counts["units_done"] == 1
    assert not list(out.glob(".tmp-*"))
    assert merge(out)["files"] == single["files"]


def test_rerun_with_other_settings_is_refused(env, text_shards):
    out, _, _ = text_shards
    other = job(env, "text", out, caption_column="alt")
    with pytest.raises(ValueError, match="other inputs or settings"):
        run_shard_job(other)


def test_flipped_byte_is_detected_and_named(text_shards, tmp_path):
    out, _, manifest = text_shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard_name = next(n for n in manifest["files"] if n.endswith(".mds"))
    data = bytearray((copy / shard_name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / shard_name).write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=shard_name):
        PreparedDataset(str(copy))


def test_truncated_shard_is_detected(text_shards, tmp_path):
    out, _, manifest = text_shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard_name = next(n for n in manifest["files"] if n.endswith(".mds"))
    (copy / shard_name).write_bytes((copy / shard_name).read_bytes()[:-10])
    with pytest.raises(CorruptShardError, match="does not match"):
        PreparedDataset(str(copy))


def test_remote_dataset_is_mirrored_then_verified(text_shards, tmp_path):
    # s3://, gs://, ... go through streaming's downloaders; a plain path uses its local one.
    from megatron_transfusion.data.source import _mirror

    out, _, _ = text_shards
    cache = _mirror(str(out), tmp_path / "cache")
    mirrored, original = PreparedDataset(str(cache)), PreparedDataset(str(out))
    assert len(mirrored) == len(original)
    assert mirrored[3]["tokens"].tolist() == original[3]["tokens"].tolist()
    with pytest.raises(ValueError, match="data.cache_dir"):
        PreparedDataset("s3://bucket/dataset")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from data_prep.shard import main

    with pytest.raises(SystemExit, match="error: input '.*missing' does not exist"):
        main(
            [
                "shard",
                "--kind",
                "text",
                "--inputs",
                str(tmp_path / "missing"),
                "--out",
                str(tmp_path / "o"),
                "--tokenizer",
                str(tmp_path / "t.json"),
            ]
        )
    with pytest.raises(SystemExit, match="plan.json' is missing"):
        main(["merge", "--out", str(tmp_path / "nothing")])
