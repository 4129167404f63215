"""Readers for the inputs users actually have. Each yields records or ``Rejected``
entries (never raises for one bad sample or a damaged file), so the sharding job can count
and name them.

- image–caption: webdataset-style tar shards (``KEY.jpg|png|webp`` + ``KEY.txt`` and/or
  ``KEY.json``, as img2dataset writes them), Parquet with an image-bytes column and
  a caption column, or a folder of image files with the same sidecars;
- images alone (VAE training): the same inputs, captions not read;
- text: JSONL or Parquet with a text column;
- interleaved documents (OBELICS/MMC4-style): Parquet or JSONL rows with a list of texts and
  a list of images, one of the two set at each index, or webdataset tars of ordered parts
  (``KEY.0.txt``, ``KEY.1.png``, ...);
- image edits: Parquet or JSONL rows with an input image, an instruction and an output
  image, or tars of ``KEY.input.png`` + ``KEY.txt`` + ``KEY.output.png``.

Images of documents and edits are bytes, a Hugging Face ``{bytes, path}`` dict or a file path
(relative to the table's folder); URLs are refused, as this job never downloads.
"""

from __future__ import annotations

import json
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.images import center_crop_resize, decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTENSIONS = (".txt", ".json")
IMAGE_SUFFIXES = (".tar", ".parquet")  # and folders of image files
TEXT_SUFFIXES = (".jsonl", ".parquet")
DOCUMENT_KINDS = ("interleaved", "image_edit")  # stored as text and image parts, in order
DOCUMENT_SUFFIXES = (".jsonl", ".parquet", ".tar")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


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
class ImagePart:
    """An image of a document: encoded bytes, whether it is given (an edit's input image,
    not generated), and its index among the input's parts, which a rejection names."""

    data: bytes
    given: bool
    index: int


@dataclass(frozen=True)
class DocumentRecord:
    """An interleaved document or an image edit: stripped non-empty texts and images, in order."""

    key: str
    parts: tuple[str | ImagePart, ...]


@dataclass(frozen=True)
class Rejected:
    key: str
    reason: str  # a short identifier, counted in the job summary
    detail: str = ""
    part: int | None = None  # the failing part of a document, by its index in the input


@dataclass(frozen=True)
class Columns:
    """Which fields hold what; configurable because every dataset names them differently."""

    image: str = "image"
    caption: str = "caption"
    text: str = "text"
    texts: str = "texts"  # interleaved: two lists, a text or an image at each index
    images: str = "images"
    input_image: str = "input_image"
    instruction: str = "instruction"  # also the .json field in image-edit tars
    output_image: str = "output_image"


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
    missing = _missing_field(record, key, name)
    return missing or _string(record[name], key, name)


def _missing_field(record, key: str, name: str) -> Rejected | None:
    if not isinstance(record, dict):
        return Rejected(key, "not_an_object", f"a JSON {type(record).__name__}, expected an object")
    if name not in record:
        fields = ", ".join(record) or "no fields"
        return Rejected(key, "missing_column", f"'{name}' (the record has: {fields})")
    return None


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


def _parquet_rows(
    path: Path, wanted: list[str], batch_rows: int = 1024
) -> Iterator[tuple[int, dict] | Rejected]:
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
        for batch in table.iter_batches(columns=wanted, batch_size=batch_rows):
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


def _jsonl_values(path: Path) -> Iterator[tuple[str, object] | Rejected]:
    """(key, decoded JSON value) of each non-blank line."""
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            key = f"{path.name}:{line_number}"
            if not line.strip():
                continue
            text = _decode_text(line, key)
            value = text if isinstance(text, Rejected) else _json(text, key)
            yield value if isinstance(value, Rejected) else (key, value)


def read_jsonl(path: Path, columns: Columns) -> Iterator[TextRecord | Rejected]:
    for item in _jsonl_values(path):
        if isinstance(item, Rejected):
            yield item
            continue
        key, value = item
        yield _text_record(key, _field(value, key, columns.text))


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


def _table_records(path: Path, wanted: list[str]) -> Iterator[tuple[str, dict] | Rejected]:
    """(key, record) of each Parquet row or JSONL line, with the ``wanted`` fields."""
    if path.suffix == ".parquet":
        for item in _parquet_rows(path, wanted, batch_rows=128):  # rows hold several images
            yield item if isinstance(item, Rejected) else (f"{path.name}/{item[0]}", item[1])
        return
    for item in _jsonl_values(path):
        if isinstance(item, Rejected):
            yield item
            continue
        key, record = item
        missing = [rejected for name in wanted if (rejected := _missing_field(record, key, name))]
        yield missing[0] if missing else (key, record)


def _image_bytes(value, folder: Path, key: str, name: str, index: int) -> bytes | Rejected:
    """The encoded image a table cell holds: bytes, a Hugging Face ``{bytes, path}`` dict,
    or a file path, relative to ``folder`` (the table's) unless absolute."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if not value:
        return Rejected(key, "missing_image", f"no image in '{name}'", index)
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        return Rejected(
            key,
            "not_an_image",
            f"'{name}' holds a {type(value).__name__}: expected image bytes, a "
            "{bytes, path} dict or a file path",
            index,
        )
    if _URL.match(value):
        return Rejected(
            key,
            "image_url",
            f"'{value[:200]}' is a URL, and this job downloads nothing: download the images "
            "first (e.g. with img2dataset) and give their bytes or file paths",
            index,
        )
    try:
        return (folder / value).read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL character
        return Rejected(key, "unreadable_image", str(e), index)


def _document(key: str, parts: list[str | ImagePart]) -> DocumentRecord | Rejected:
    if not parts:
        return Rejected(key, "empty_document", "no text and no images")
    return DocumentRecord(key, tuple(parts))


def _interleaved_row(key: str, record: dict, columns: Columns, folder: Path):
    """An OBELICS-style row: equally long lists of texts and images, at each index one of
    the two set; the index order is the document's."""
    texts, images = record[columns.texts], record[columns.images]
    for name, value in ((columns.texts, texts), (columns.images, images)):
        if not isinstance(value, list):
            return Rejected(key, "not_a_list", f"'{name}' is a {type(value).__name__}")
    if len(texts) != len(images):
        return Rejected(
            key,
            "bad_parts",
            f"'{columns.texts}' has {len(texts)} entries, '{columns.images}' {len(images)}: "
            "expected a text or an image at each index",
        )
    parts: list[str | ImagePart] = []
    for index, (text, image) in enumerate(zip(texts, images)):
        if text is not None and image is not None:
            return Rejected(key, "bad_parts", f"both a text and an image at index {index}", index)
        if text is None:
            data = _image_bytes(image, folder, key, columns.images, index)
            if isinstance(data, Rejected):
                return data
            parts.append(ImagePart(data, False, index))
            continue
        text = _string(text, key, columns.texts)
        if isinstance(text, Rejected):
            return replace(text, part=index)
        if text.strip():
            parts.append(text.strip())
    return _document(key, parts)


def _interleaved_members(key: str, members: dict[str, bytes]) -> DocumentRecord | Rejected:
    """``KEY.<index>.txt|jpg|...`` members, ordered by their index; others (``KEY.json``
    metadata, say) are not parts."""
    indexed: dict[int, tuple[str, bytes]] = {}
    for rest, data in members.items():
        index, _, ext = rest.rpartition(".")
        ext = f".{ext.lower()}"
        if ext != ".txt" and ext not in IMAGE_EXTENSIONS:
            continue
        if not index.isdecimal():
            return Rejected(
                key,
                "bad_part_index",
                f"member 'KEY.{rest}': the part index must be a whole number (KEY.<index>{ext})",
            )
        if int(index) in indexed:
            return Rejected(key, "bad_part_index", f"two members of part {int(index)}", int(index))
        indexed[int(index)] = ext, data
    parts: list[str | ImagePart] = []
    for index in sorted(indexed):
        ext, data = indexed[index]
        if ext != ".txt":
            parts.append(ImagePart(data, False, index))
            continue
        text = _decode_text(data, key)
        if isinstance(text, Rejected):
            return replace(text, part=index)
        if text.strip():
            parts.append(text.strip())
    return _document(key, parts)


def _edit(key: str, given: bytes, instruction: str | Rejected, output: bytes | Rejected):
    """(input image, instruction, output image); rejections in that order of parts."""
    if isinstance(instruction, Rejected):
        return replace(instruction, part=1)
    if not instruction.strip():
        return Rejected(key, "missing_instruction", "empty instruction", 1)
    if isinstance(output, Rejected):
        return output
    return DocumentRecord(
        key, (ImagePart(given, True, 0), instruction.strip(), ImagePart(output, False, 2))
    )


def _edit_row(key: str, record: dict, columns: Columns, folder: Path):
    given = _image_bytes(record[columns.input_image], folder, key, columns.input_image, 0)
    if isinstance(given, Rejected):
        return given
    instruction = _string(record[columns.instruction], key, columns.instruction)
    output = _image_bytes(record[columns.output_image], folder, key, columns.output_image, 2)
    return _edit(key, given, instruction, output)


def _edit_members(key: str, members: dict[str, bytes], columns: Columns):
    """``KEY.input.<image>``, ``KEY.output.<image>`` and the instruction in ``KEY.txt`` or
    the ``columns.instruction`` field of ``KEY.json``."""
    images = {}
    for rest, data in members.items():
        role, _, ext = rest.rpartition(".")
        if role in ("input", "output") and f".{ext.lower()}" in IMAGE_EXTENSIONS:
            images[role] = data
    if "input" not in images:
        return Rejected(key, "missing_image", "no KEY.input.<jpg|png|webp> member", 0)
    if "txt" in members:
        instruction = _decode_text(members["txt"], key)
    elif "json" in members:
        instruction = _caption_from_json(members["json"], key, columns.instruction)
    else:
        instruction = Rejected(key, "missing_instruction", "no KEY.txt or KEY.json member")
    output = images.get("output") or Rejected(
        key, "missing_image", "no KEY.output.<jpg|png|webp> member", 2
    )
    return _edit(key, images["input"], instruction, output)


def _tar_groups(path: Path) -> Iterator[tuple[str, dict[str, bytes]] | Rejected]:
    """Members grouped as webdataset does: the key is the name up to the first dot of its
    last component, and each member is named by the rest (``0.txt``, ``input.png``)."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                directory, slash, name = member.name.rpartition("/")
                stem, dot, rest = name.partition(".")
                if member.isfile() and dot:
                    members = groups.setdefault(directory + slash + stem, {})
                    members[rest] = tar.extractfile(member).read()
    except _UNREADABLE as e:
        yield Rejected(f"{path}", "unreadable_file", str(e))
    for stem, members in groups.items():  # in tar order
        yield f"{path.name}/{stem}", members


def read_documents(path: Path, kind: str, columns: Columns) -> Iterator[DocumentRecord | Rejected]:
    """Interleaved documents (``kind`` "interleaved") or image edits ("image_edit") of one
    tar, Parquet or JSONL file."""
    interleaved = kind == "interleaved"
    if path.suffix == ".tar":
        for item in _tar_groups(path):
            if isinstance(item, Rejected):
                yield item
            else:
                yield _interleaved_members(*item) if interleaved else _edit_members(*item, columns)
        return
    if interleaved:
        wanted, row = [columns.texts, columns.images], _interleaved_row
    else:
        wanted, row = [columns.input_image, columns.instruction, columns.output_image], _edit_row
    for item in _table_records(path, wanted):
        yield item if isinstance(item, Rejected) else row(*item, columns, path.parent)


def read_unit(path: Path, kind: str, columns: Columns):
    """All records of one input (a file, or a folder of images). ``kind`` "image" reads the
    images of image–caption inputs without their captions."""
    if kind == "text":
        return (read_jsonl if path.suffix == ".jsonl" else read_text_parquet)(path, columns)
    if kind in DOCUMENT_KINDS:
        return read_documents(path, kind, columns)
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
        image = _decode(record.image, record.key, size, min_size)
        yield image if isinstance(image, Rejected) else (record, image)


def decode_documents(
    records: Iterator[DocumentRecord | Rejected], size: int, min_size: int
) -> Iterator[tuple[DocumentRecord, list[np.ndarray]] | Rejected]:
    """Each document with its images decoded as ``decode_images`` does. One bad image
    rejects the whole document, naming the image's part: the text around an image refers
    to it, so the text without it, or followed by the next image, would be a wrong example."""
    for record in records:
        if isinstance(record, Rejected):
            yield record
            continue
        images = []
        for part in record.parts:
            if isinstance(part, ImagePart):
                image = _decode(part.data, record.key, size, min_size)
                if isinstance(image, Rejected):
                    yield replace(image, part=part.index)
                    break
                images.append(image)
        else:
            yield record, images


def _decode(data: bytes, key: str, size: int, min_size: int) -> np.ndarray | Rejected:
    try:
        decoded = decode_image(data)
    except ValueError as e:
        return Rejected(key, "undecodable_image", str(e))
    if min(decoded.size) < min_size:
        width, height = decoded.size
        return Rejected(
            key,
            "image_too_small",
            f"{width}×{height} px; the shorter side must be ≥ {min_size} px (--min-image-size)",
        )
    return center_crop_resize(decoded, size)
