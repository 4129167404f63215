"""Readers for the inputs users actually have. Each yields records or ``Rejected``
entries (never raises for one bad sample), so the sharding job can count and name them.

- image–caption: webdataset-style tar shards (``KEY.jpg|png|webp`` + ``KEY.txt`` and/or
  ``KEY.json``, as img2dataset writes them) or Parquet with an image-bytes column and
  a caption column;
- text: JSONL or Parquet with a text column.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_CAPTION_SUFFIXES = (".tar", ".parquet")
TEXT_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class ImageCaptionRecord:
    key: str
    image: bytes
    caption: str


@dataclass(frozen=True)
class TextRecord:
    key: str
    text: str


@dataclass(frozen=True)
class Rejected:
    key: str
    reason: str  # a short identifier, counted in the job summary
    detail: str = ""


@dataclass(frozen=True)
class Columns:
    """Which fields hold what; configurable because every dataset names them differently."""

    image: str = "image"
    caption: str = "caption"
    text: str = "text"


def expand_inputs(inputs: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named directly or found under directories, sorted so that every task of a
    job array sees the same list."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.suffix in suffixes and p.is_file()]
        elif path.is_file():
            if path.suffix not in suffixes:
                raise ValueError(f"input '{path}': expected one of {', '.join(suffixes)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"input '{path}' does not exist")
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files in {inputs}")
    return sorted(set(files))


def _decode_text(data: bytes, key: str) -> str | Rejected:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(key, "not_utf8", str(e))


def _caption_from_json(data: bytes, key: str, field: str) -> str | Rejected:
    try:
        value = json.loads(data).get(field)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        return Rejected(key, "bad_json", str(e))
    return value if isinstance(value, str) else Rejected(key, "missing_caption", f"no '{field}'")


def read_tar(path: Path, columns: Columns) -> Iterator[ImageCaptionRecord | Rejected]:
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, dot, ext = member.name.rpartition(".")
                if not dot:
                    continue
                if stem not in groups:
                    groups[stem] = {}
                    order.append(stem)
                groups[stem]["." + ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Rejected(f"{path}", "unreadable_file", str(e))
    for stem in order:
        key = f"{path.name}/{stem}"
        parts = groups[stem]
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            yield Rejected(key, "missing_image")
            continue
        if ".txt" in parts:
            caption = _decode_text(parts[".txt"], key)
        elif ".json" in parts:
            caption = _caption_from_json(parts[".json"], key, columns.caption)
        else:
            caption = Rejected(key, "missing_caption")
        if isinstance(caption, Rejected):
            yield caption
        elif not caption.strip():
            yield Rejected(key, "missing_caption", "empty caption")
        else:
            yield ImageCaptionRecord(key, image, caption.strip())


def _parquet_rows(path: Path, wanted: list[str]) -> Iterator[tuple[int, dict]]:
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"parquet file '{path}' has no column(s) {missing} (columns: {names}); "
                             "set the column names in the job's options")  # fmt: skip
        row = 0
        for batch in table.iter_batches(columns=wanted, batch_size=1024):
            for record in batch.to_pylist():
                yield row, record
                row += 1
    except (OSError, pa.ArrowException) as e:
        raise OSError(f"parquet file '{path}' is unreadable: {e}") from None


def read_image_caption_parquet(path: Path, columns: Columns) -> Iterator[ImageCaptionRecord | Rejected]:
    for row, record in _parquet_rows(path, [columns.image, columns.caption]):
        key = f"{path.name}/{row}"
        image, caption = record[columns.image], record[columns.caption]
        if isinstance(image, dict):  # Hugging Face datasets store images as {bytes, path}
            image = image.get("bytes")
        if not image:
            yield Rejected(key, "missing_image")
        elif not isinstance(caption, str) or not caption.strip():
            yield Rejected(key, "missing_caption")
        else:
            yield ImageCaptionRecord(key, bytes(image), caption.strip())


def read_jsonl(path: Path, columns: Columns) -> Iterator[TextRecord | Rejected]:
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            key = f"{path.name}:{line_number}"
            if not line.strip():
                continue
            text = _decode_text(line, key)
            if isinstance(text, Rejected):
                yield text
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield Rejected(key, "bad_json", str(e))
                continue
            value = value.get(columns.text) if isinstance(value, dict) else None
            if not isinstance(value, str) or not value.strip():
                yield Rejected(key, "empty_text")
            else:
                yield TextRecord(key, value)


def read_text_parquet(path: Path, columns: Columns) -> Iterator[TextRecord | Rejected]:
    for row, record in _parquet_rows(path, [columns.text]):
        key = f"{path.name}/{row}"
        value = record[columns.text]
        if not isinstance(value, str) or not value.strip():
            yield Rejected(key, "empty_text")
        else:
            yield TextRecord(key, value)


def read_unit(path: Path, kind: str, columns: Columns):
    """All records of one input file."""
    if kind == "image_caption":
        reader = read_tar if path.suffix == ".tar" else read_image_caption_parquet
    else:
        reader = read_jsonl if path.suffix == ".jsonl" else read_text_parquet
    return reader(path, columns)
