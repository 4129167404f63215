"""Every kind of path model weights come from, opened one way: a training checkpoint (any
layout, any engine), a consolidated ``.safetensors`` export, a Hugging Face export of this
project, or a Hugging Face Llama (``hf:DIR``). Each loads into model chunks of any TP/PP
layout; what it lacks (the patch layers of a language model, say) stays as initialised
and is reported, never silently.

A run starts from one with ``checkpoint.init_from`` (weights only: fresh optimizer, step 0,
fresh data order); inference and export load through it too. A model's weights only mean
something with the tokenizer its embeddings were trained on and the VAE its patch layers
saw, so each source carries those fingerprints (``made_with``) where it knows them, and
``check_made_with`` refuses a mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from checkpoints import CheckpointError, layout
from checkpoints.export import read_export_metadata
from checkpoints.huggingface import HFLlama, read_json
from checkpoints.publish import verify_checkpoint, warn_unverified
from checkpoints.sharded import load_model_weights
from checkpoints.whole import load_whole, summarize
from megatron_transfusion.config import ModelConfig, UserError
from megatron_transfusion.data.source import sha256_file

HF_PREFIX = "hf:"
PATCH_LAYERS = ("patch_in.", "patch_out.")


def _is_patch_layer(name: str) -> bool:
    return name.startswith(PATCH_LAYERS)


@dataclass
class WeightsSource:
    description: str
    path: Path  # the file or directory the weights are in
    # Fills model chunks, returns the names of the tensors it does not have.
    _load: Callable[[list, ModelConfig], list[str]]
    # Checks the files against their manifest or SHA-256; run by the first ``load``, when
    # the process group is up, so the ranks split the hashing.
    _verify: Callable[[], None] | None = None
    config: dict | None = None  # the experiment config the weights were trained with
    step: int = 0
    # {"tokenizer": fingerprint, "vae": fingerprint}; a None value: trained without one
    # (a language model has no VAE); None: not recorded (older checkpoints).
    made_with: dict | None = None
    may_be_fresh: Callable[[str], bool] = lambda name: False

    @property
    def run_dir(self) -> Path | None:
        """The run a step checkpoint belongs to (its samples and evaluations go there);
        None for exports, which stand alone."""
        return self.path.parent.parent if (self.path / layout.TRAINER_STATE).is_file() else None

    def load(self, chunks, model: ModelConfig) -> list[str]:
        """Fill this rank's chunks; returns what stayed fresh, all of it ``may_be_fresh``."""
        if self._verify is not None:
            self._verify()
            self._verify = None
        fresh = self._load(chunks, model)
        for name in fresh:
            if not self.may_be_fresh(name):
                raise CheckpointError(f"{self.description} has no tensor '{name}'")
        return fresh


def open_weights(spec: str | Path, verify: bool = True) -> WeightsSource:
    """A source from ``hf:DIR`` or any checkpoint path ``layout.find_checkpoint`` takes.
    ``verify``: check its files against their manifest or SHA-256 before loading."""
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        return _hf_source(Path(spec.removeprefix(HF_PREFIX)), verify)
    path = layout.find_checkpoint(spec)
    if layout.is_hf_export(path):
        return _hf_source(path, verify)
    if path.suffix == ".safetensors":
        return _export_source(path, verify)
    return _sharded_source(path, verify)


def _hf_source(directory: Path, verify: bool) -> WeightsSource:
    """A Hugging Face Llama; with this project's side files, the whole Transfusion model."""
    hf = HFLlama(directory)
    if not layout.is_hf_export(directory):
        tokenizer = hf.tokenizer_file()
        return WeightsSource(
            f"hf:{directory}",
            directory,
            lambda chunks, model: load_whole(chunks, hf.checked_tensors(model), f"'{directory}'"),
            made_with={
                "tokenizer": _file_fingerprint(tokenizer) if tokenizer else None,
                "vae": None,
            },
            may_be_fresh=_is_patch_layer,
        )
    side = read_json(directory / layout.HF_TRANSFUSION)

    def load(chunks, model: ModelConfig) -> list[str]:
        text, patches = hf.checked_tensors(model), _tensors_of(directory / layout.HF_PATCH_LAYERS)

        def tensors(name: str):
            patch = patches(name)
            return patch if patch is not None else text(name)

        return load_whole(chunks, tensors, f"'{directory}'")

    return WeightsSource(
        str(directory),
        directory,
        load,
        (lambda: verify_checkpoint(directory)) if verify else None,
        config=side.get("config"),
        step=int(side.get("step", 0)),
        made_with=side.get("made_with"),
    )


def _tensors_of(path: Path):
    """name -> tensor (None if absent) of a safetensors file, each read when asked for."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"'{path}' is missing")
    file = safe_open(str(path), "pt")
    names = set(file.keys())
    return lambda name: file.get_tensor(name) if name in names else None


def _export_source(path: Path, verify: bool) -> WeightsSource:
    # One file, nothing for the ranks to split: checked now, so that a damaged export is
    # refused before a process group exists (as before sources: load_for_inference).
    metadata = read_export_metadata(path, verify=verify)
    if "config" not in metadata:
        raise CheckpointError(
            f"'{path}' has no config in its metadata: not written by mtf-checkpoint export"
        )
    return WeightsSource(
        str(path),
        path,
        lambda chunks, model: load_whole(chunks, _tensors_of(path), f"'{path}'"),
        config=yaml.safe_load(metadata["config"]),
        step=int(metadata.get("step", 0)),
        made_with=json.loads(metadata["made_with"]) if "made_with" in metadata else None,
        may_be_fresh=_is_patch_layer,
    )


def _sharded_source(checkpoint: Path, verify: bool) -> WeightsSource:
    trainer = layout.read_trainer_state(checkpoint)
    return WeightsSource(
        str(checkpoint),
        checkpoint,
        lambda chunks, model: load_model_weights(chunks, checkpoint, _is_patch_layer),
        (lambda: verify_checkpoint(checkpoint)) if verify else None,
        config=yaml.safe_load(layout.run_config_path(checkpoint).read_text()),
        step=int(trainer["step"]),
        made_with=trainer.get("made_with"),
        may_be_fresh=_is_patch_layer,
    )


def _file_fingerprint(path: Path) -> dict:
    return {"path": str(path), "sha256": sha256_file(path)}


def check_made_with(description: str, theirs: dict | None, ours: dict) -> None:
    """UserError if weights were trained with another tokenizer or VAE (``theirs``) than
    this run's data was made with (``ours``); a warning where they do not say."""
    if theirs is None:
        warn_unverified(f"{description} does not record its tokenizer and VAE")
        return
    for what, part in (("tokenizer", "embeddings"), ("vae", "patch layers")):
        a, b = theirs.get(what), ours.get(what)
        if a is None and b is not None and what == "tokenizer":
            warn_unverified(f"{description} does not say which tokenizer it was trained with")
        if a is None or b is None:
            continue  # nothing to agree with: e.g. a language model has no VAE
        if a["sha256"] != b["sha256"]:
            flag = "--tokenizer" if what == "tokenizer" else "--vae"
            raise UserError(
                f"{description} was trained with the {what} {a['path']} (sha256 "
                f"{a['sha256'][:12]}…), this run's data was made with {b['path']} (sha256 "
                f"{b['sha256'][:12]}…): its {part} would not match; shard the data with "
                f"{flag} {a['path']}"
            )


def initialize_weights(chunks, model: ModelConfig, spec: str, made_with: dict) -> str:
    """``checkpoint.init_from``: this rank's chunks from ``spec``, weights only, after
    checking the source was trained with this run's tokenizer and VAE. Returns the line
    the trainer logs, naming what stayed fresh."""
    source = open_weights(spec)
    check_made_with(source.description, source.made_with, made_with)
    fresh = source.load(chunks, model)
    line = f"initialised from {source.description} (its step {source.step}), weights only"
    if fresh:
        line += f"; initialised fresh: {summarize(fresh)}"
    return line
