"""A consolidated export: the model alone, unsharded, as one safetensors file with the
run's config and its own SHA-256 in its metadata, which inference and other frameworks
read without Megatron's loader."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import torch
import yaml

from checkpoints import CheckpointError, layout
from checkpoints.publish import verify_checkpoint, warn_unverified
from checkpoints.sharded import load_model_weights
from megatron_transfusion import platform
from megatron_transfusion.config import UserError, load_config
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed

EXPORT_DIGEST = "sha256"  # the metadata field of an exported .safetensors that holds its SHA-256
_UNSET_DIGEST = "0" * 64


def _read_header(f) -> tuple[bytes, bytes]:
    """A safetensors file's 8-byte header length and its JSON header; ``f`` is left at the data."""
    prefix = f.read(8)
    return prefix, f.read(struct.unpack("<Q", prefix)[0])


def _export_digest(path: Path, stored: str) -> str:
    """SHA-256 of a safetensors file read with ``stored`` (its digest field's value) as zeros:
    every byte but the digest's own, header (step, config, shapes) and tensor data alike."""
    with open(path, "rb") as f:
        prefix, header = _read_header(f)
        if header.count(stored.encode()) != 1:
            raise CheckpointError(
                f"'{path}' has a damaged header (its {EXPORT_DIGEST} field); export the "
                "checkpoint again, or pass --no-verify to load it anyway"
            )
        digest = hashlib.sha256(prefix + header.replace(stored.encode(), _UNSET_DIGEST.encode()))
        return hashlib.file_digest(f, lambda: digest).hexdigest()  # the tensor data, from here on


def save_export(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write one safetensors file with its SHA-256 in its metadata (``EXPORT_DIGEST``), under a
    temporary name until complete: the digest goes in place of zeros, so no offset moves."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file(tensors, tmp, metadata={**metadata, EXPORT_DIGEST: _UNSET_DIGEST})
    digest = _export_digest(tmp, _UNSET_DIGEST)
    with open(tmp, "r+b") as f:
        prefix, header = _read_header(f)
        f.seek(len(prefix) + header.index(_UNSET_DIGEST.encode()))
        f.write(digest.encode())
    os.replace(tmp, out)


def verify_export(path: Path, metadata: dict[str, str]) -> None:
    """An exported file against the SHA-256 in its ``metadata``; one exported before files had
    it loads with a warning, as a checkpoint without a manifest does."""
    stored = metadata.get(EXPORT_DIGEST)
    if stored is None:
        warn_unverified(
            f"'{path}' has no {EXPORT_DIGEST} in its metadata (exported before exports had one)"
        )
        return
    if _export_digest(path, stored) != stored:
        raise CheckpointError(
            f"'{path}' does not match the SHA-256 in its metadata: it is damaged; export the "
            "checkpoint again, or pass --no-verify to load it anyway"
        )


def read_export_metadata(path: Path, verify: bool = True) -> dict[str, str]:
    """The metadata of a consolidated file; CheckpointError if it is not a whole safetensors
    file or, with ``verify``, does not match the SHA-256 it holds."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"'{path}' is not a readable safetensors file ({e}): it is truncated or "
            "damaged; export the checkpoint again"
        ) from None
    if verify:
        verify_export(path, metadata)
    return metadata


def export_checkpoint(path: Path, out: Path, verify: bool = True) -> Path:
    """Load the model at TP=1/PP=1 in this process and save it as one safetensors file
    (with its SHA-256 inside, checked wherever it is loaded)."""
    checkpoint = layout.find_checkpoint(path)
    if checkpoint.suffix == ".safetensors":
        raise UserError(f"'{checkpoint}' is already an exported file")
    if verify:
        verify_checkpoint(checkpoint)
    config_path = layout.run_config_path(checkpoint)
    cfg = load_config(
        str(config_path),
        [
            "parallel.tensor_parallel=1",
            "parallel.pipeline_parallel=1",
            "parallel.virtual_pipeline=null",
        ],
    )
    plat = platform.activate()
    init_distributed(cfg.parallel, plat)
    try:
        (model,) = build_model(cfg, plat)
        load_model_weights([model], checkpoint)
        tensors = {
            k: v.contiguous() for k, v in model.state_dict().items() if hasattr(v, "contiguous")
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        step = layout.read_trainer_state(checkpoint)["step"]
        save_export(tensors, out, {"step": str(step), "config": yaml.safe_dump(cfg.to_dict())})
    finally:
        destroy_distributed()
    return out
