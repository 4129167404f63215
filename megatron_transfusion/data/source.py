"""One prepared dataset (the output of ``mtf-prepare-data``): verified, then read by index.

mosaicml-streaming's MDS readers decode samples; remote datasets are mirrored into a
local cache with streaming's downloaders first. Shard files are checked against the
SHA-256s in manifest.json before anything is read, because streaming itself only checks
hashes on download: a flipped byte in a local shard would otherwise go unnoticed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT, IMAGE = "text", "image_caption"  # the kinds of source
INTERLEAVED, IMAGE_EDIT = "interleaved", "image_edit"  # stored as documents (batch.GENERATED_IMAGE)
DOCUMENT_KINDS = (INTERLEAVED, IMAGE_EDIT)


@dataclass(frozen=True)
class DocumentParts:
    """The parts of every document of a source (``parts.npy``, ``part_offsets.npy``)."""

    parts: np.ndarray  # all documents' parts, concatenated
    offsets: np.ndarray  # document i: parts[offsets[i] : offsets[i + 1]]

    def of(self, index: int) -> np.ndarray:
        return self.parts[self.offsets[index] : self.offsets[index + 1]]

    def images(self) -> np.ndarray:
        """Images per document."""
        counts = np.concatenate([[0], np.cumsum(self.parts < 0)])
        return counts[self.offsets[1:]] - counts[self.offsets[:-1]]


def mds_array(array: np.ndarray) -> np.ndarray:
    """``array``, or a one-element stand-in where it is empty: MDS cannot store an array
    without elements (a document with no images has no latents, an image-only one no text
    tokens). ``PreparedDataset`` reads the stand-in back as the empty array, as the
    document's parts say how many tokens and images it has."""
    return array if array.size else np.zeros(1, array.dtype)


def _restore_empty(sample: dict, latent_shape: list[int]) -> dict:
    parts = sample["parts"]
    if not (parts < 0).any():
        sample["latents"] = np.zeros((0, *latent_shape), np.float16)
    if not parts[parts > 0].any():
        sample["tokens"] = np.zeros(0, np.int32)
    return sample


class CorruptShardError(RuntimeError):
    """A shard file does not match its manifest."""


def sha256_file(path: Path) -> str:
    """Streamed, so shard files of any size hash in constant memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def made_with(manifests: list[dict]) -> dict:
    """The tokenizer and VAE fingerprints of a run's data, from its datasets' manifests
    (the loader checks they agree): what a checkpoint records it was trained with. ``vae``
    is None for text-only data."""
    images = [m for m in manifests if m["kind"] != TEXT]
    return {"tokenizer": manifests[0]["tokenizer"], "vae": images[0]["vae"] if images else None}


def local_manifests(locations) -> list[dict]:
    """The manifests of those of a run's prepared datasets that are local directories."""
    found = []
    for location in locations:
        if location and "://" not in location and (Path(location) / "manifest.json").is_file():
            found.append(json.loads((Path(location) / "manifest.json").read_text()))
    return found


def _mirror(remote: str, cache: Path) -> Path:
    """Copy a remote dataset (any URL streaming can download) into ``cache``."""
    from streaming.base.storage.download import CloudDownloader

    cache.mkdir(parents=True, exist_ok=True)
    CloudDownloader.direct_download(
        f"{remote.rstrip('/')}/manifest.json", str(cache / "manifest.json")
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    for name in manifest["files"]:
        target = cache / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            CloudDownloader.direct_download(f"{remote.rstrip('/')}/{name}", str(target))
    return cache


class PreparedDataset:
    def __init__(self, location: str, cache_dir: str | None = None, verify: bool = True):
        if "://" in location:
            if cache_dir is None:
                raise ValueError(f"dataset '{location}' is remote: set data.cache_dir")
            name = hashlib.sha256(location.encode()).hexdigest()[:16]
            self.directory = _mirror(location, Path(cache_dir) / name)
        else:
            self.directory = Path(location)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(
                f"'{self.directory}' has no manifest.json: prepare it with `mtf-prepare-data shard` "
                "and finish with `mtf-prepare-data merge`"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if verify:
            self.verify()
        self.lengths = np.load(self.directory / "lengths.npy")
        self.documents = None
        if self.kind in DOCUMENT_KINDS:
            self.documents = DocumentParts(
                np.load(self.directory / "parts.npy"), np.load(self.directory / "part_offsets.npy")
            )
            offsets = self.documents.offsets
            if len(offsets) != len(self.lengths) + 1 or offsets[-1] != len(self.documents.parts):
                raise CorruptShardError(
                    f"'{self.directory}': part_offsets.npy does not fit lengths.npy and parts.npy"
                )
        self._readers, offsets = [], [0]
        from streaming.base.format import reader_from_json

        index = json.loads((self.directory / "index.json").read_text())
        for shard in index["shards"]:
            self._readers.append(reader_from_json(str(self.directory), None, shard))
            offsets.append(offsets[-1] + shard["samples"])
        self._offsets = np.asarray(offsets)
        if (
            self._offsets[-1] != len(self.lengths)
            or len(self.lengths) != self.manifest["num_samples"]
        ):
            raise CorruptShardError(
                f"'{self.directory}': index.json, lengths.npy and manifest.json "
                "disagree on the number of samples"
            )

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def verify(self) -> None:
        for name, expected in self.manifest["files"].items():
            path = self.directory / name
            if not path.exists():
                raise CorruptShardError(f"shard file '{path}' is missing")
            if sha256_file(path) != expected:
                raise CorruptShardError(
                    f"shard file '{path}' does not match its SHA-256 in manifest.json: it is "
                    "corrupt; restore it or re-run the sharding job for this dataset"
                )

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        sample = self._readers[shard].get_item(index - int(self._offsets[shard]))
        if "parts" in sample:  # an interleaved document or an image edit
            return _restore_empty(sample, self.manifest["latent_shape"])
        return sample
