"""The offline sharding job: inputs -> tokenized text / VAE latents -> MDS shards.

Work is cut into *units* (one per input file or folder of images, in sorted order, recorded
in plan.json), so a job array splits it (task i of N takes units i, i+N, ...) and any split
produces the same units. Each unit is written to a temporary directory and renamed into
place when complete: a killed task never leaves a unit that looks finished, and a re-run
skips the finished ones. ``merge`` then checks every unit is there and writes one MDS index
plus ``manifest.json`` (provenance, counts, a SHA-256 per shard file) and ``lengths.npy``
(tokens per sample, which the loader plans packing from without reading samples).

Text documents are stored whole, however long: the loader cuts them to the training
sequence length (``megatron_transfusion.data.mixture``), so one sharding serves every
``data.seq_length``. A job in which every record was rejected (a wrong ``--text-column``,
say) fails with the most common reason instead of writing an empty dataset.

Interleaved documents (``--kind interleaved``) and image edits (``--kind image_edit``: input
image, instruction, output image) are stored alike, with no truncation either:

    tokens   int32 [t]           every text part's tokens, concatenated in order
    parts    int32 [p]           in order: n >= 0 the next n tokens, GENERATED_IMAGE the next
                                 latent, generated; GIVEN_IMAGE the next, given (an edit's input)
    latents  float16 [i, C, H, W]

and merge writes ``parts.npy`` (every document's parts, in sample order) and
``part_offsets.npy`` (document i's are ``parts[offsets[i]:offsets[i + 1]]``) beside
``lengths.npy`` (text tokens per document), so the loader plans from them alone. One bad
image (missing, undecodable, too small, a URL) drops its whole document, counted once under
the image's reason with the failing part in ``rejected.jsonl``: the text around an image
refers to it, and keeping that text without the image, or followed by the next one, would
teach the model that text goes with the wrong image.

    mtf-prepare-data shard --kind image_caption --inputs data/*.tar photos/ --out shards/img \\
        --tokenizer tok.json --vae vae/ --image-size 256 [--shard-index I --num-shards N]
    mtf-prepare-data shard --kind interleaved --inputs obelics/*.parquet --out shards/docs \\
        --tokenizer tok.json --vae vae/ --image-size 256
    mtf-prepare-data merge --out shards/img
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_prep.readers import (
    DOCUMENT_KINDS,
    DOCUMENT_SUFFIXES,
    IMAGE_SUFFIXES,
    TEXT_SUFFIXES,
    Columns,
    ImagePart,
    Rejected,
    decode_documents,
    decode_images,
    default_min_image_size,
    expand_inputs,
    read_unit,
)
from megatron_transfusion.batch import GENERATED_IMAGE, GIVEN_IMAGE
from megatron_transfusion.data.source import mds_array

log = logging.getLogger("data_prep.shard")
FORMAT_VERSION = 1
TEXT_COLUMNS = {"key": "str", "tokens": "ndarray:int32"}
IMAGE_CAPTION_COLUMNS = {"key": "str", "caption": "ndarray:int32", "latent": "ndarray:float16"}
DOCUMENT_COLUMNS = {
    "key": "str",
    "tokens": "ndarray:int32",
    "parts": "ndarray:int32",
    "latents": "ndarray:float16",
}
KINDS = ("text", "image_caption", *DOCUMENT_KINDS)
IMAGE_KINDS = ("image_caption", *DOCUMENT_KINDS)
# The Columns fields each kind reads, recorded in plan.json; text and image_caption keep the
# three that plans recorded before the document kinds, so their unfinished jobs still resume.
PLAN_COLUMNS = {
    "text": ("image", "caption", "text"),
    "image_caption": ("image", "caption", "text"),
    "interleaved": ("texts", "images"),
    "image_edit": ("input_image", "instruction", "output_image"),
}


@dataclass
class ShardJob:
    kind: str  # one of KINDS
    inputs: list[str]
    out: str
    tokenizer: str
    vae: str | None = None
    image_size: int = 256
    min_image_size: int | None = None  # smaller images are rejected; None: half of image_size
    max_caption_tokens: int = 128  # image_caption: longer captions are truncated (and counted)
    batch_size: int = 64  # images per VAE forward
    shard_size_limit: int = 1 << 26
    columns: Columns = field(default_factory=Columns)
    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"--kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind in IMAGE_KINDS and not self.vae:
            raise ValueError(f"--vae is required for {self.kind} data")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard-index {self.shard_index} is not in [0, {self.num_shards})")
        if self.min_image_size is None:
            self.min_image_size = default_min_image_size(self.image_size)


class _Encoders:
    """Tokenizer and VAE, loaded once per task."""

    def __init__(self, job: ShardJob):
        from data_prep.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.load(job.tokenizer)
        self.vae = None
        if job.kind in IMAGE_KINDS:
            from data_prep.vae import load_vae

            self.vae = load_vae(job.vae)
            if job.image_size % self.vae.downsample:
                raise ValueError(
                    f"--image-size {job.image_size} is not a multiple of the VAE's "
                    f"downsampling factor {self.vae.downsample}"
                )

    def provenance(self, job: ShardJob) -> dict:
        settings = {
            "format_version": FORMAT_VERSION,
            "kind": job.kind,
            "tokenizer": self.tokenizer.fingerprint(),
            "columns": {name: getattr(job.columns, name) for name in PLAN_COLUMNS[job.kind]},
        }
        if self.vae is not None:
            side = job.image_size // self.vae.downsample
            settings.update(
                vae=self.vae.fingerprint(),
                image_size=job.image_size,
                min_image_size=job.min_image_size,
                latent_shape=[self.vae.latent_channels, side, side],
            )
        if job.kind == "image_caption":
            settings["max_caption_tokens"] = job.max_caption_tokens
        return settings

    def latents(self, images: list[np.ndarray], batch_size: int) -> np.ndarray:
        """float16 [n, C, H, W] latents of uint8 images, ``batch_size`` per VAE forward."""
        from data_prep.images import to_model_range

        encoded = []
        for start in range(0, len(images), batch_size):
            pixels = to_model_range(np.stack(images[start : start + batch_size]))
            with torch.no_grad():
                encoded.append(self.vae.encode(pixels).to(torch.float16).numpy())
        return np.concatenate(encoded)


def _unit_name(index: int) -> str:
    return f"unit-{index:06d}"


def _write_plan(job: ShardJob, units: list[Path], provenance: dict) -> None:
    """plan.json pins the unit list and settings; every task and re-run must agree."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"units": [str(u) for u in units], "settings": provenance}
    path = out / "plan.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != plan:
            raise ValueError(
                f"'{path}' was written for other inputs or settings; use a new --out directory "
                "or delete it to start over"
            )
        return
    tmp = out / f".plan.json.{os.getpid()}"
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, path)  # concurrent tasks write identical content


class _UnitWriter:
    def __init__(self, directory: Path, columns: dict, size_limit: int):
        from streaming import MDSWriter

        self.writer = MDSWriter(out=str(directory), columns=columns, size_limit=size_limit)
        self.lengths: list[int] = []
        self.parts: list[np.ndarray] | None = [] if "parts" in columns else None

    def write(self, sample: dict, length: int) -> None:
        self.writer.write(sample)
        self.lengths.append(length)
        if self.parts is not None:
            self.parts.append(sample["parts"])

    def finish(self, directory: Path) -> None:
        self.writer.finish()
        np.save(directory / "lengths.npy", np.asarray(self.lengths, dtype=np.int32))
        if self.parts is not None:
            parts = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int32)
            _save_parts(directory, parts, np.asarray([len(p) for p in self.parts]))


def _save_parts(directory: Path, parts: np.ndarray, counts: np.ndarray) -> None:
    """parts.npy and part_offsets.npy: every document's parts in sample order, and where
    each document's begin (plus the end)."""
    np.save(directory / "parts.npy", parts.astype(np.int32))
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    np.save(directory / "part_offsets.npy", offsets.astype(np.int64))


def _process_text(
    path: Path, job: ShardJob, enc: _Encoders, out: _UnitWriter, stats: Counter, rejected
):
    for record in read_unit(path, "text", job.columns):
        stats["read"] += 1
        if isinstance(record, Rejected):
            rejected(record)
            continue
        ids = enc.tokenizer.encode(record.text)
        if not ids:
            rejected(Rejected(record.key, "empty_text", "no tokens"))
            continue
        out.write({"key": record.key, "tokens": np.asarray(ids, dtype=np.int32)}, len(ids))
        stats["written"] += 1


def _process_images(
    path: Path, job: ShardJob, enc: _Encoders, out: _UnitWriter, stats: Counter, rejected
):
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []

    def flush():
        if not pending:
            return
        latents = enc.latents([p[1] for p in pending], job.batch_size)
        for (key, _, caption), latent in zip(pending, latents):
            out.write({"key": key, "caption": caption, "latent": latent}, len(caption))
            stats["written"] += 1
        pending.clear()

    records = read_unit(path, "image_caption", job.columns)
    for item in decode_images(records, job.image_size, job.min_image_size):
        stats["read"] += 1
        if isinstance(item, Rejected):
            rejected(item)
            continue
        record, image = item
        ids = enc.tokenizer.encode(record.caption)
        if not ids:
            rejected(Rejected(record.key, "missing_caption", "no tokens"))
            continue
        if len(ids) > job.max_caption_tokens:
            stats["captions_truncated"] += 1
            ids = ids[: job.max_caption_tokens]
        pending.append((record.key, image, np.asarray(ids, dtype=np.int32)))
        if len(pending) == job.batch_size:
            flush()
    flush()


def _process_documents(
    path: Path, job: ShardJob, enc: _Encoders, out: _UnitWriter, stats: Counter, rejected
):
    """Interleaved documents and image edits, written in order once ``batch_size`` images
    (or documents) are pending, so the VAE encodes full batches across documents."""
    pending: list[tuple[str, list[int], list[int]]] = []  # key, tokens, parts
    images: list[np.ndarray] = []

    def flush():
        latents = enc.latents(images, job.batch_size) if images else np.zeros(0, np.float16)
        first = 0
        for key, tokens, parts in pending:
            count = sum(part < 0 for part in parts)
            sample = {
                "key": key,
                "tokens": mds_array(np.asarray(tokens, dtype=np.int32)),
                "parts": np.asarray(parts, dtype=np.int32),
                "latents": mds_array(latents[first : first + count]),
            }
            out.write(sample, len(tokens))
            first += count
            stats["written"] += 1
            stats["images_written"] += count
        pending.clear()
        images.clear()

    records = read_unit(path, job.kind, job.columns)
    for item in decode_documents(records, job.image_size, job.min_image_size):
        stats["read"] += 1
        if isinstance(item, Rejected):
            rejected(item)
            continue
        record, decoded = item
        tokens, parts = [], []
        for part in record.parts:
            if isinstance(part, ImagePart):
                parts.append(GIVEN_IMAGE if part.given else GENERATED_IMAGE)
            elif ids := enc.tokenizer.encode(part):
                tokens += ids
                parts.append(len(ids))
        if job.kind == "image_edit" and not tokens:
            rejected(Rejected(record.key, "missing_instruction", "no tokens", 1))
            continue
        if not parts:
            rejected(Rejected(record.key, "empty_document", "no tokens and no images"))
            continue
        pending.append((record.key, tokens, parts))
        images += decoded
        if len(images) >= job.batch_size or len(pending) >= job.batch_size:
            flush()
    flush()


def _process_unit(index: int, path: Path, job: ShardJob, enc: _Encoders) -> Counter:
    out_dir = Path(job.out)
    final = out_dir / _unit_name(index)
    for stale in out_dir.glob(f".tmp-{_unit_name(index)}-*"):
        shutil.rmtree(stale)  # left by a killed task
    tmp = out_dir / f".tmp-{_unit_name(index)}-{os.getpid()}"
    columns = {"text": TEXT_COLUMNS, "image_caption": IMAGE_CAPTION_COLUMNS}.get(
        job.kind, DOCUMENT_COLUMNS
    )
    writer = _UnitWriter(tmp, columns, job.shard_size_limit)
    stats: Counter = Counter()
    with open(tmp / "rejected.jsonl", "w") as rejected_file:

        def rejected(item: Rejected):
            stats[f"rejected_{item.reason}"] += 1
            log.warning("skipped %s: %s %s", item.key, item.reason, item.detail)
            entry = {"key": item.key, "reason": item.reason, "detail": item.detail}
            if item.part is not None:
                entry["part"] = item.part
            rejected_file.write(json.dumps({**entry, "input": str(path)}) + "\n")

        process = {"text": _process_text, "image_caption": _process_images}.get(
            job.kind, _process_documents
        )
        process(path, job, enc, writer, stats, rejected)
    writer.finish(tmp)
    (tmp / "stats.json").write_text(json.dumps({"input": str(path), **stats}))
    os.rename(tmp, final)  # atomic: the unit now exists, complete
    return stats


class AllRejected(ValueError):
    """Every record read was rejected: the options (a column name, say) do not fit the inputs."""


def _top_rejection(rejected_files: list[Path]) -> str:
    """The most common rejection in ``rejected.jsonl`` files, in words, with its first record."""
    records = [json.loads(line) for f in rejected_files if f.exists() for line in f.open()]
    if not records:
        return "no records were read"
    reason, count = Counter(r["reason"] for r in records).most_common(1)[0]
    first = next(r for r in records if r["reason"] == reason)
    detail = f" {' '.join(first['detail'].split())}" if first["detail"] else ""  # one line
    part = f" part {first['part']}" if "part" in first else ""
    where = f"first: {first['key']}{part} in {first['input']}"
    return f"{reason}{detail} ({count} of {len(records)} rejected; {where})"


def run_shard_job(job: ShardJob) -> Counter:
    """Process this task's units; returns counts (units skipped because already done too).
    Raises ``AllRejected`` if this task read records and every one was rejected."""
    if job.kind == "text":
        units = expand_inputs(job.inputs, TEXT_SUFFIXES)
    elif job.kind == "image_caption":
        units = expand_inputs(job.inputs, IMAGE_SUFFIXES, image_folders=True)
    else:
        units = expand_inputs(job.inputs, DOCUMENT_SUFFIXES)
    enc = _Encoders(job)
    _write_plan(job, units, enc.provenance(job))
    mine = list(range(job.shard_index, len(units), job.num_shards))
    totals: Counter = Counter()
    for index in tqdm(mine, desc=f"shard task {job.shard_index}/{job.num_shards}", unit="file"):
        if (Path(job.out) / _unit_name(index)).is_dir():
            totals["units_already_done"] += 1
            continue
        totals.update(_process_unit(index, units[index], job, enc))
        totals["units_done"] += 1
    if totals["units_done"] and not totals["written"]:
        done = [Path(job.out) / _unit_name(i) / "rejected.jsonl" for i in mine]
        raise AllRejected(
            f"every record of {_unit_count(totals['units_done'])} was rejected: "
            f"{_top_rejection(done)}; fix the options, shard into a new "
            "--out"
        )
    return totals


def _unit_count(n: int) -> str:
    return f"the {n} input unit{'s' if n > 1 else ''}"


def merge(out: str | Path) -> dict:
    """Join finished units into one dataset: index.json, lengths.npy, manifest.json, and
    parts.npy + part_offsets.npy for interleaved documents and image edits."""
    from streaming.base.util import merge_index

    from megatron_transfusion.data.source import sha256_file

    out = Path(out)
    plan_path = out / "plan.json"
    if not plan_path.exists():
        raise FileNotFoundError(f"'{plan_path}' is missing: run the shard job into '{out}' first")
    plan = json.loads(plan_path.read_text())
    names = [_unit_name(i) for i in range(len(plan["units"]))]
    missing = [n for n in names if not (out / n / "stats.json").exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(names)} units are not finished in '{out}' "
            f"(first: {missing[0]}); "
            "re-run the shard job (finished units are skipped), then merge again"
        )
    lengths = np.concatenate([np.load(out / n / "lengths.npy") for n in names]).astype(np.int32)
    if not len(lengths):
        rejected_files = [out / n / "rejected.jsonl" for n in names]
        raise AllRejected(f"'{out}' holds no samples: {_top_rejection(rejected_files)}")
    merge_index([str(out / n / "index.json") for n in names], str(out))
    index = json.loads((out / "index.json").read_text())
    if len(lengths) != sum(s["samples"] for s in index["shards"]):
        raise RuntimeError(f"'{out}': lengths and shard sample counts disagree")
    np.save(out / "lengths.npy", lengths)
    part_files = []
    if plan["settings"]["kind"] in DOCUMENT_KINDS:
        offsets = [np.load(out / n / "part_offsets.npy") for n in names]
        if sum(len(o) - 1 for o in offsets) != len(lengths):
            raise RuntimeError(f"'{out}': part_offsets and shard sample counts disagree")
        parts = np.concatenate([np.load(out / n / "parts.npy") for n in names])
        _save_parts(out, parts, np.concatenate([np.diff(o) for o in offsets]))
        part_files = ["parts.npy", "part_offsets.npy"]
    totals: Counter = Counter()
    with open(out / "rejected.jsonl", "w") as rejected:
        for n in names:
            stats = json.loads((out / n / "stats.json").read_text())
            stats.pop("input")
            totals.update(stats)
            rejected.write((out / n / "rejected.jsonl").read_text())
    shard_files = sorted(
        info["basename"]
        for shard in index["shards"]
        for key in ("raw_data", "zip_data")
        if (info := shard.get(key))
    )
    manifest = {
        **plan["settings"],
        "num_samples": int(len(lengths)),
        "num_tokens": int(lengths.sum()),
        "counts": dict(totals),
        "inputs": plan["units"],
        "files": {
            name: sha256_file(out / name)
            for name in [*shard_files, "index.json", "lengths.npy", *part_files]
        },
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def _array_task_defaults() -> tuple[int, int]:
    """Task index and count from a Slurm job array, else a single task."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    return task, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))


def _summary(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing to do"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mtf-prepare-data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shard = commands.add_parser("shard", help="tokenize / VAE-encode inputs into MDS units")
    shard.add_argument("--kind", required=True, choices=KINDS)
    shard.add_argument(
        "--inputs",
        nargs="+",
        required=True,
        help="files or directories (tar, Parquet, JSONL); for image_caption also folders of "
        "images (KEY.png + KEY.txt)",
    )
    shard.add_argument("--out", required=True)
    shard.add_argument("--tokenizer", required=True, help="tokenizer.json or SentencePiece .model")
    shard.add_argument("--vae", help="VAE directory (this project's or diffusers AutoencoderKL)")
    shard.add_argument("--image-size", type=int, default=256)
    shard.add_argument(
        "--min-image-size",
        type=int,
        help="reject images whose shorter side is smaller (default: half of --image-size)",
    )
    shard.add_argument("--max-caption-tokens", type=int, default=128, help="image_caption")
    shard.add_argument("--batch-size", type=int, default=64, help="images per VAE forward")
    shard.add_argument("--image-column", default="image")
    shard.add_argument("--caption-column", default="caption", help="also the .json field in tars")
    shard.add_argument("--text-column", default="text", help="JSONL field / Parquet column")
    shard.add_argument("--texts-column", default="texts", help="interleaved: the list of texts")
    shard.add_argument(
        "--images-column", default="images", help="interleaved: the list of images, same length"
    )
    shard.add_argument("--input-image-column", default="input_image", help="image_edit")
    shard.add_argument(
        "--instruction-column", default="instruction", help="image_edit; also the .json field"
    )
    shard.add_argument("--output-image-column", default="output_image", help="image_edit")
    task, count = _array_task_defaults()
    shard.add_argument("--shard-index", type=int, default=task, help="default: SLURM_ARRAY_TASK_ID")
    shard.add_argument("--num-shards", type=int, default=count, help="default: SLURM array size")
    merge_cmd = commands.add_parser("merge", help="write one index + manifest over all units")
    merge_cmd.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "merge":
            manifest = merge(args.out)
            print(
                f"merged {manifest['num_samples']} samples, {manifest['num_tokens']} tokens "
                f"into {args.out}: {_summary(Counter(manifest['counts']))}"
            )
            return
        job = ShardJob(
            kind=args.kind,
            inputs=args.inputs,
            out=args.out,
            tokenizer=args.tokenizer,
            vae=args.vae,
            image_size=args.image_size,
            min_image_size=args.min_image_size,
            max_caption_tokens=args.max_caption_tokens,
            batch_size=args.batch_size,
            columns=Columns(
                image=args.image_column,
                caption=args.caption_column,
                text=args.text_column,
                texts=args.texts_column,
                images=args.images_column,
                input_image=args.input_image_column,
                instruction=args.instruction_column,
                output_image=args.output_image_column,
            ),
            shard_index=args.shard_index,
            num_shards=args.num_shards,
        )
        print(f"task {job.shard_index}/{job.num_shards}: {_summary(run_shard_job(job))}")
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
