"""A checkpoint's manifest, checked before loading, and its atomic publication.

The manifest (``manifest.json``: every file's size and SHA-256) is integrity, not
authenticity: it catches a flipped byte, a truncated or a deleted file before anything is
trained on or sampled from, but whoever can edit the files can edit it too. An exported
``.safetensors`` carries the same check inside itself (``export.save_export``), so it
travels with the one file.

A step directory only exists once every rank has finished writing into its staging
twin and its manifest is written there, and ``latest`` only moves after that (rank 0
renames both), so a crash at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from checkpoints import DAMAGED, CheckpointError, layout


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _digest(path: Path) -> dict:
    with open(path, "rb") as f:
        return {
            "bytes": os.fstat(f.fileno()).st_size,
            "sha256": hashlib.file_digest(f, "sha256").hexdigest(),
        }


def _digests(directory: Path, names: list[str]) -> dict[str, dict | None]:
    """Size and SHA-256 of each file (None: absent). Collective where a process group is
    up: the ranks split the files, so a large checkpoint hashes in 1/world of the time."""
    rank, world = rank_world()
    mine = {
        name: _digest(directory / name) if (directory / name).is_file() else None
        for name in names[rank::world]
    }
    if world == 1:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: digest for part in parts for name, digest in part.items()}


def write_manifest(checkpoint: Path) -> None:
    """Collective where a process group is up: record the size and SHA-256 of every file
    under ``checkpoint`` in its ``manifest.json`` (rank 0 writes it)."""
    rank, world = rank_world()
    names = [
        sorted(
            str(p.relative_to(checkpoint))
            for p in checkpoint.rglob("*")
            if p.is_file() and p.name != layout.MANIFEST
        )
    ]
    if world > 1:
        dist.broadcast_object_list(names, src=0)  # rank 0's listing: all ranks split the same files
    files = _digests(checkpoint, names[0])
    if rank == 0:
        layout.manifest_file(checkpoint).write_text(json.dumps({"files": files}, indent=1))


def warn_unverified(reason: str) -> None:
    """Rank 0 says why a file loads without a check: older files are loaded, not refused."""
    if rank_world()[0] == 0:
        print(f"warning: {reason}: it is not verified", file=sys.stderr, flush=True)


def verify_checkpoint(checkpoint: Path) -> None:
    """Collective where a process group is up. Every file of ``checkpoint`` against its
    manifest; CheckpointError naming the first that is missing, truncated or changed.
    A checkpoint from before manifests is loaded with a warning: refusing it would stop
    runs that resume across this change."""
    path = layout.manifest_file(checkpoint)
    if not path.exists():
        warn_unverified(
            f"'{checkpoint}' has no {layout.MANIFEST} (written before checkpoints had one)"
        )
        return
    try:
        files = {
            str(name): {"bytes": int(entry["bytes"]), "sha256": str(entry["sha256"])}
            for name, entry in json.loads(path.read_text())["files"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"'{path}' is damaged ({type(e).__name__}: {e}); {DAMAGED}") from None
    names = sorted(files)
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(
                f"'{path}' lists '{name}', which is outside the checkpoint; {DAMAGED}"
            )
    found = _digests(checkpoint, names)
    for name in names:
        file, expected, actual = checkpoint / name, files[name], found[name]
        if actual is None:
            raise CheckpointError(f"checkpoint file '{file}' is missing; {DAMAGED}")
        if actual["bytes"] != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file '{file}' has {actual['bytes']} bytes, {layout.MANIFEST} says "
                f"{expected['bytes']}: it is truncated or damaged; {DAMAGED}"
            )
        if actual["sha256"] != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint file '{file}' does not match its SHA-256 in {layout.MANIFEST}: it is "
                f"damaged; {DAMAGED}"
            )


def publish_checkpoint(staging: Path, final: Path, keep_last: int) -> None:
    """Collective, once every rank's files are in ``staging``: write its manifest, rename
    it to ``final`` (replacing a checkpoint of the same step, e.g. re-saved after a resume),
    point ``latest`` at it and keep the newest ``keep_last`` complete checkpoints."""
    write_manifest(staging)
    if dist.get_rank() == 0:
        directory = final.parent
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        pointer = directory / f".{layout.LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, layout.latest_file(directory))
        for old in layout.complete_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
