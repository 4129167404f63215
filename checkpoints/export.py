"""A consolidated export: the model alone, unsharded, as one safetensors file with the
run's config and its own SHA-256 in its metadata, which inference and other frameworks
read without Megatron's loader."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from checkpoints import CheckpointError, layout
from checkpoints.huggingface import (
    CONFIG,
    hf_config,
    hf_tensors,
    replace_directory,
    write_safetensors_shards,
)
from checkpoints.publish import verify_checkpoint, warn_unverified, write_manifest
from checkpoints.sharded import load_model_weights
from data_prep.tokenizer import Tokenizer
from megatron_transfusion import platform
from megatron_transfusion.config import UserError, load_config
from megatron_transfusion.data.source import local_manifests, made_with, sha256_file
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


@contextmanager
def consolidated_model(path: Path, verify: bool = True):
    """The model of a checkpoint directory, loaded at TP=1/PP=1 in this process, with its
    config, step and the tokenizer/VAE fingerprints it was trained with (or None)."""
    checkpoint = layout.find_checkpoint(path)
    if checkpoint.suffix == ".safetensors" or layout.is_hf_export(checkpoint):
        raise UserError(f"'{checkpoint}' is already an export; pass the checkpoint it came from")
    if verify:
        verify_checkpoint(checkpoint)
    cfg = load_config(
        str(layout.run_config_path(checkpoint)),
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
        trainer = layout.read_trainer_state(checkpoint)
        found = trainer.get("made_with")
        if found is None:  # written before checkpoints recorded it: the run's data says
            manifests = local_manifests(s.path for s in cfg.data.sources)
            found = made_with(manifests) if manifests else None
        yield model, cfg, trainer["step"], found
    finally:
        destroy_distributed()


def model_tensors(model) -> dict[str, torch.Tensor]:
    """A TP=1/PP=1 model's tensors by state_dict name (Megatron's extra states dropped)."""
    return {k: v.contiguous() for k, v in model.state_dict().items() if hasattr(v, "contiguous")}


def export_checkpoint(path: Path, out: Path, verify: bool = True) -> Path:
    """Save a checkpoint's model as one safetensors file (with its SHA-256 inside, checked
    wherever it is loaded)."""
    with consolidated_model(path, verify) as (model, cfg, step, made):
        out.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"step": str(step), "config": yaml.safe_dump(cfg.to_dict())}
        if made is not None:
            metadata["made_with"] = json.dumps(made)
        save_export(model_tensors(model), out, metadata)
    return out


def _run_tokenizer(made: dict | None) -> Tokenizer | None:
    """The tokenizer a model was trained with, if its file is still where it was."""
    recorded = (made or {}).get("tokenizer")
    if recorded is None:
        warn_unverified("the checkpoint does not record its tokenizer, so none is exported")
        return None
    path = Path(recorded["path"])
    if not path.is_file() or sha256_file(path) != recorded["sha256"]:
        warn_unverified(f"the tokenizer {path} is gone or changed, so none is exported")
        return None
    return Tokenizer.load(path)


def export_hf(path: Path, out: Path, verify: bool = True, max_shard_bytes: int = 5 << 30) -> Path:
    """A Hugging Face directory ``transformers`` loads as a ``LlamaForCausalLM`` (the text
    model and its tokenizer), plus the patch layers and the run's config, tokenizer and
    VAE fingerprints beside it (``layout``: the Hugging Face export), which
    ``checkpoints.sources`` loads back whole. Written under a temporary name until complete."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"'{out}' already exists; choose another --out or remove it")
    with consolidated_model(path, verify) as (model, cfg, step, made):
        staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        text, patches = hf_tensors(model_tensors(model), cfg.model)
        write_safetensors_shards(text, staging, max_shard_bytes)
        save_file(patches, staging / layout.HF_PATCH_LAYERS)
        tokenizer = _run_tokenizer(made)
        special = asdict(tokenizer.special) if tokenizer else None
        dtype = next(model.parameters()).dtype
        (staging / CONFIG).write_text(json.dumps(hf_config(cfg.model, dtype, special), indent=1))
        if tokenizer is not None:
            tokenizer.save_hf(staging)
        side = {"config": cfg.to_dict(), "step": step, "made_with": made, "special_tokens": special}
        (staging / layout.HF_TRANSFUSION).write_text(json.dumps(side, indent=1))
        write_manifest(staging)
        replace_directory(staging, out)
    return out
