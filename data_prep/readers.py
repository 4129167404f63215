"""Readers for the inputs users actually have. Each yields records or ``Rejected``
entries (never raises for one bad sample or a damaged file), so the sharding job can count
and name them.

- image–caption: webdataset-style tar shards (``KEY.jpg|png|webp`` + ``KEY.txt`` and/or
  ``KEY.json``, as img2dataset writes them), Parquet with an image-bytes column and
  a caption column, or a folder of image files with the same sidecars;
- images alone (VAE training): the same inputs, captions not read;
- text: JSONL or Parquet with a text column.
"""

from __future__ import annotations

import json
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.images import center_crop_resize, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSIONS = (".txt", ".json")
IMAGE_SUFFIXES = (".tar", ".parquet")  # and folders of image files
TEXT_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class ImageRecord:
    key: str
    image: bytes


@dataclass(frozen=True)
class ImageCaptionRecord(ImageRecord):
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


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() for p in folder.iterdir())


def expand_inputs(
    inputs: list[str], suffixes: tuple[str, ...], image_folders: bool = False
) -> list[Path]:
    """Files named directly or found under directories, sorted so that every task of a
    job array sees the same list. With ``image_folders``, every directory (the named one or
    one below it) with image files directly inside is one more input: a folder of images."""
    units: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for p in [path, *path.rglob("*")]:
                if (p.is_file() and p.suffix in suffixes) or (
                    image_folders and p.is_dir() and _has_images(p)
                ):
                    units.append(p)
        elif path.is_file():
            if path.suffix not in suffixes:
                expected = ", ".join(suffixes) + (" or a folder of images" if image_folders else "")
                raise ValueError(f"input '{path}': expected one of {expected}")
            units.append(path)
        else:
            raise FileNotFoundError(f"input '{path}' does not exist")
    if not units:
        folders = " or image files" if image_folders else ""
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files{folders} in {inputs}")
    return sorted(set(units))


# What a damaged file raises while it is read: a tar's gzip/xz stream raises zlib's and
# lzma's own errors, which are not OSErrors.
_UNREADABLE = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


def _json(data: bytes | str, key: str):
    """The decoded JSON value, or a ``bad_json`` rejection: also for what the json module
    refuses with other errors (nesting deeper than the interpreter's recursion limit, an
    integer of more than 4,300 digits)."""
    try:
        return json.loads(data)
    except (
        ValueError,
        RecursionError,
    ) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return Rejected(key, "bad_json", str(e))


def _decode_text(data: bytes, key: str) -> str | Rejected:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(key, "not_utf8", str(e))


def _field(record, key: str, name: str) -> str | Rejected:
    """The string ``record[name]`` of a decoded JSON record, or a rejection that says what
    was wrong: not an object, no such field (a wrong column option rejects everything with
    this reason), or not a string."""
    if not isinstance(record, dict):
        return Rejected(key, "not_an_object", f"a JSON {type(record).__name__}, expected an object")
    if name not in record:
        fields = ", ".join(record) or "no fields"
        return Rejected(key, "missing_column", f"'{name}' (the record has: {fields})")
    return _string(record[name], key, name)


def _string(value, key: str, name: str) -> str | Rejected:
    if value is None:
        return ""  # null counts as empty: the callers reject it as such
    if not isinstance(value, str):
        return Rejected(key, "not_a_string", f"'{name}' is a {type(value).__name__}")
    try:
        value.encode("utf-8")  # a JSON escape of a lone surrogate (\ud800) decodes to no text
    except UnicodeEncodeError as e:
        return Rejected(key, "not_utf8", f"'{name}': {e}")
    return value


def _caption_from_json(data: bytes, key: str, field: str) -> str | Rejected:
    record = _json(data, key)
    return record if isinstance(record, Rejected) else _field(record, key, field)


def _sample(
    key: str, parts: dict[str, bytes], columns: Columns, captions: bool
) -> ImageRecord | Rejected:
    """One webdataset-style sample (extension -> bytes): its image, and with ``captions`` a
    caption from ``KEY.txt`` or the ``columns.caption`` field of ``KEY.json``."""
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    if image is None:
        return Rejected(key, "missing_image")
    if not captions:
        return ImageRecord(key, image)
    if ".txt" in parts:
        caption = _decode_text(parts[".txt"], key)
    elif ".json" in parts:
        caption = _caption_from_json(parts[".json"], key, columns.caption)
    else:
        caption = Rejected(key, "missing_caption")
    if isinstance(caption, Rejected):
        return caption
    if not caption.strip():
        return Rejected(key, "missing_caption", "empty caption")
    return ImageCaptionRecord(key, image, caption.strip())


ImageRecords = Iterator[ImageRecord | Rejected]  # ImageCaptionRecords where captions are read


def read_tar(path: Path, columns: Columns, captions: bool = True) -> ImageRecords:
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, dot, ext = member.name.rpartition(".")
                if dot:
                    groups.setdefault(stem, {})["." + ext.lower()] = tar.extractfile(member).read()
    except _UNREADABLE as e:
        yield Rejected(f"{path}", "unreadable_file", str(e))
    for stem, parts in groups.items():  # in tar order
        yield _sample(f"{path.name}/{stem}", parts, columns, captions)


def read_image_folder(path: Path, columns: Columns, captions: bool = True) -> ImageRecords:
    """The image files directly in ``path`` (sorted by name), captions from sidecar files as
    in a tar: ``KEY.png`` + ``KEY.txt`` is the folder form of the same sample."""
    groups: dict[str, dict[str, Path]] = {}
    for file in sorted(path.iterdir()):
        ext = file.suffix.lower()
        if ext in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS and file.is_file():
            groups.setdefault(file.stem, {})[ext] = file
    for stem, files in groups.items():
        key = f"{path.name}/{stem}"
        try:
            parts = {ext: file.read_bytes() for ext, file in files.items()}
        except OSError as e:
            yield Rejected(key, "unreadable_file", str(e))
            continue
        yield _sample(key, parts, columns, captions)


def _parquet_rows(path: Path, wanted: list[str]) -> Iterator[tuple[int, dict] | Rejected]:
    """(row number, record) of each row; a file that is damaged where it is read ends with
    one ``unreadable_file`` rejection, as a tar does. Missing columns are the job's options
    not fitting the data: an error."""
    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
    except (OSError, pa.ArrowException) as e:
        yield Rejected(f"{path}", "unreadable_file", str(e))
        return
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(
            f"parquet file '{path}' has no column(s) {missing} (columns: {names}); "
            "set the column names in the job's options"
        )
    row = 0
    try:
        for batch in table.iter_batches(columns=wanted, batch_size=1024):
            try:
                records = batch.to_pylist()
            except UnicodeDecodeError:  # a string column holds bytes that are not UTF-8: whose?
                records = [
                    _parquet_row(batch, i, f"{path.name}/{row + i}") for i in range(batch.num_rows)
                ]
            for record in records:
                yield record if isinstance(record, Rejected) else (row, record)
                row += 1
    except (OSError, pa.ArrowException) as e:
        yield Rejected(f"{path}", "unreadable_file", f"after {row} rows: {e}")


def _parquet_row(batch: pa.RecordBatch, i: int, key: str) -> dict | Rejected:
    try:
        return {name: column[i].as_py() for name, column in zip(batch.schema.names, batch.columns)}
    except UnicodeDecodeError as e:
        return Rejected(key, "not_utf8", str(e))


def read_image_parquet(path: Path, columns: Columns, captions: bool = True) -> ImageRecords:
    wanted = [columns.image, columns.caption] if captions else [columns.image]
    for item in _parquet_rows(path, wanted):
        if isinstance(item, Rejected):
            yield item
            continue
        row, record = item
        key = f"{path.name}/{row}"
        image = record[columns.image]
        if isinstance(image, dict):  # Hugging Face datasets store images as {bytes, path}
            image = image.get("bytes")
        if not image:
            yield Rejected(key, "missing_image")
            continue
        if not captions:
            yield ImageRecord(key, bytes(image))
            continue
        caption = _string(record[columns.caption], key, columns.caption)
        if isinstance(caption, Rejected):
            yield caption
        elif not caption.strip():
            yield Rejected(key, "missing_caption", "empty caption")
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
            value = _json(text, key)
            yield (
                value
                if isinstance(value, Rejected)
                else _text_record(key, _field(value, key, columns.text))
            )


def _text_record(key: str, value: str | Rejected) -> TextRecord | Rejected:
    if isinstance(value, Rejected):
        return value
    return TextRecord(key, value) if value.strip() else Rejected(key, "empty_text")


def read_text_parquet(path: Path, columns: Columns) -> Iterator[TextRecord | Rejected]:
    for item in _parquet_rows(path, [columns.text]):
        if isinstance(item, Rejected):
            yield item
            continue
        row, record = item
        key = f"{path.name}/{row}"
        yield _text_record(key, _string(record[columns.text], key, columns.text))


def read_unit(path: Path, kind: str, columns: Columns):
    """All records of one input (a file, or a folder of images). ``kind`` "image" reads the
    images of image–caption inputs without their captions."""
    if kind == "text":
        return (read_jsonl if path.suffix == ".jsonl" else read_text_parquet)(path, columns)
    if path.is_dir():
        reader = read_image_folder
    else:
        reader = read_tar if path.suffix == ".tar" else read_image_parquet
    return reader(path, columns, captions=kind == "image_caption")


def default_min_image_size(size: int) -> int:
    """The smallest shorter side accepted for ``size``-px training images: upscaling more
    than 2× only invents pixels (a 1×1 image would become a flat colour)."""
    return max(1, size // 2)


def decode_images(
    records: ImageRecords, size: int, min_size: int | None = None
) -> Iterator[tuple[ImageRecord, np.ndarray] | Rejected]:
    """Each record with its image decoded, centre-cropped and resized to uint8 [size, size, 3]
    (what the VAE sees, when training it and when sharding); an undecodable image, or one
    whose shorter side is under ``min_size`` (default ``default_min_image_size``), is Rejected."""
    min_size = default_min_image_size(size) if min_size is None else min_size
    for record in records:
        if isinstance(record, Rejected):
            yield record
            continue
        try:
            decoded = decode_image(record.image)
        except ValueError as e:
            yield Rejected(record.key, "undecodable_image", str(e))
            continue
        if min(decoded.size) < min_size:
            width, height = decoded.size
            yield Rejected(
                record.key,
                "image_too_small",
                f"{width}×{height} px; the shorter side must be ≥ {min_size} px (--min-image-size)",
            )
            continue
        yield record, center_crop_resize(decoded, size)
