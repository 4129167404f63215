"""Everything generation and evaluation load: the model from a training checkpoint or a
consolidated export, and the tokenizer and VAE the training data was made with.

By default the tokenizer and VAE come from the training data's manifest (recorded in the
run's config), so a sample decodes with the VAE its latents were trained on; a VAE passed
by hand must be that same VAE (checked by its weights' SHA-256 when the manifest is known).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from checkpoints import layout
from checkpoints.export import read_export_metadata
from checkpoints.publish import verify_checkpoint
from checkpoints.sharded import load_model_weights
from data_prep.tokenizer import Tokenizer
from data_prep.vae import LatentEncoder, load_vae
from megatron_transfusion import platform
from megatron_transfusion.config import ExperimentConfig, config_from_tree, load_config
from megatron_transfusion.model import TransfusionModel, build_model
from megatron_transfusion.parallel import init_distributed


@dataclass
class LoadedModel:
    model: TransfusionModel
    cfg: ExperimentConfig
    step: int
    source: Path


def _inference_overrides(tensor_parallel: int) -> list[str]:
    # Generation runs unpipelined with dense-mask attention: its queries are one token or
    # one image, so the mask is small; PP-trained weights reshard to PP=1 on load. No
    # optimizer (any engine's run loads), and eager layers: compiled ones would recompile
    # for the shapes that change every few calls.
    return [
        f"parallel.tensor_parallel={tensor_parallel}",
        "parallel.pipeline_parallel=1",
        "parallel.virtual_pipeline=null",
        "parallel.sequence_parallel=false",
        "parallel.recompute=none",
        "parallel.engine=megatron",
        "parallel.zero_stage=0",
        "model.attention_backend=sdpa",
        "model.fuse_elementwise=false",
    ]


def load_for_inference(
    path: str | Path, tensor_parallel: int = 1, verify: bool = True
) -> LoadedModel:
    """Initialise the parallel state (TP over the launched ranks) and load the model.
    ``verify``: check a checkpoint directory's files against its manifest, or an exported
    file against its SHA-256, first."""
    checkpoint = layout.find_checkpoint(path)
    if checkpoint.suffix == ".safetensors":
        metadata = read_export_metadata(checkpoint, verify)
        if "config" not in metadata:
            raise ValueError(
                f"'{checkpoint}' has no config in its metadata: "
                "not written by mtf-checkpoint export"
            )
        if tensor_parallel != 1:
            raise ValueError(
                f"a consolidated file loads at tensor_parallel=1; for TP={tensor_parallel} "
                f"pass the sharded checkpoint it was exported from"
            )
        cfg = config_from_tree(yaml.safe_load(metadata["config"]), _inference_overrides(1))
        step = int(metadata.get("step", -1))
    else:
        cfg = load_config(
            str(layout.run_config_path(checkpoint)), _inference_overrides(tensor_parallel)
        )
    plat = platform.activate()
    init_distributed(cfg.parallel, plat)
    if checkpoint.suffix != ".safetensors":
        if verify:
            verify_checkpoint(checkpoint)
        step = layout.read_trainer_state(checkpoint)["step"]
    (model,) = build_model(cfg, plat)
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(checkpoint), device=str(plat.device()))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(
                f"'{checkpoint}' does not match the model of its config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    else:
        load_model_weights([model], checkpoint)
    return LoadedModel(model.eval(), cfg, step, checkpoint)


def _manifest(cfg: ExperimentConfig) -> dict | None:
    """The training data's manifest when it is a local directory (image data first: it
    names the VAE as well as the tokenizer)."""
    for location in (cfg.data.image_caption_data, cfg.data.text_data):
        if location and (Path(location) / "manifest.json").is_file():
            return json.loads((Path(location) / "manifest.json").read_text())
    return None


def load_tokenizer(cfg: ExperimentConfig, path: str | Path | None = None) -> Tokenizer:
    manifest = _manifest(cfg)
    if path is None:
        if manifest is None:
            raise FileNotFoundError(
                "the run's training data is not local, so its tokenizer is unknown: "
                "pass --tokenizer PATH"
            )
        path = manifest["tokenizer"]["path"]
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tokenizer.vocab_size} tokens, the model only "
            f"{cfg.model.vocab_size} (model.vocab_size)"
        )
    if manifest is not None:
        trained = manifest["tokenizer"]["special"]
        if {k: getattr(tokenizer.special, k) for k in trained} != trained:
            raise ValueError(
                f"tokenizer {path} has special ids {tokenizer.special}, the training data {trained}"
            )
    return tokenizer


def load_image_vae(cfg: ExperimentConfig, path: str | Path | None = None) -> LatentEncoder:
    manifest = _manifest(cfg)
    trained = manifest.get("vae") if manifest else None
    if path is None:
        if trained is None:
            raise FileNotFoundError(
                "the run's image data is not local, so its VAE is unknown: pass --vae PATH"
            )
        path = trained["path"]
    vae = load_vae(
        path, expected_latent_channels=cfg.model.latent_channels, device=platform.current().device()
    )
    if trained is not None and vae.sha256 != trained["sha256"]:
        raise ValueError(
            f"VAE {path} (weights sha256 {vae.sha256[:12]}…) is not the VAE the training "
            f"latents were made with ({trained['path']}, sha256 {trained['sha256'][:12]}…)"
        )
    return vae
