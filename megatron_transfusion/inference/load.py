"""Everything generation and evaluation load: the model from a training checkpoint, an
export or a Hugging Face export (``checkpoints.sources``), and the tokenizer and VAE the
training data was made with.

By default the tokenizer and VAE come from the training data's manifest (recorded in the
run's config), so a sample decodes with the VAE its latents were trained on; a VAE passed
by hand must be that same VAE (checked by its weights' SHA-256 when the manifest is known).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from checkpoints import layout
from checkpoints.sources import open_weights
from checkpoints.whole import summarize
from data_prep.tokenizer import HF_FILES, Tokenizer
from data_prep.vae import LatentEncoder, load_vae
from megatron_transfusion import platform
from megatron_transfusion.config import ExperimentConfig, UserError, config_from_tree
from megatron_transfusion.data.source import local_manifests
from megatron_transfusion.model import TransfusionModel, build_model
from megatron_transfusion.parallel import init_distributed


@dataclass
class LoadedModel:
    model: TransfusionModel
    cfg: ExperimentConfig
    step: int
    source: Path  # the checkpoint directory or export loaded
    run_dir: Path | None  # the run of a step checkpoint; None for an export

    @property
    def bundled_tokenizer(self) -> Path | None:
        """A Hugging Face export carries its tokenizer: the default where none is given."""
        has = self.source.is_dir() and any((self.source / f).is_file() for f in HF_FILES)
        return self.source if has else None

    def output_dir(self, kind: str) -> Path:
        """Where outputs of ``kind`` ("samples", "eval") made from this model go by default:
        the run's ``<kind>/step_N``, or beside an export."""
        if self.run_dir is None:
            return self.source.parent / f"{self.source.stem}_{kind}"
        return self.run_dir / kind / layout.step_name(self.step)


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
    """Initialise the parallel state (TP over the launched ranks) and load the model from
    any checkpoint, export or Hugging Face export (``checkpoints.sources``). ``verify``:
    check its files against their manifest or SHA-256 first."""
    source = open_weights(path, verify)
    if source.config is None:
        raise UserError(
            f"{source.description} is a language model without a Transfusion config: import it "
            "with `mtf-checkpoint import-hf`, or start a run from it with checkpoint.init_from"
        )
    cfg = config_from_tree(source.config, _inference_overrides(tensor_parallel))
    plat = platform.activate()
    init_distributed(cfg.parallel, plat)
    (model,) = build_model(cfg, plat)
    fresh = source.load([model], cfg.model)
    if fresh:
        raise UserError(
            f"{source.description} does not match the model of its config: it has no "
            f"{summarize(fresh)}"
        )
    return LoadedModel(model.eval(), cfg, source.step, source.path, source.run_dir)


def _manifest(cfg: ExperimentConfig) -> dict | None:
    """The training data's manifest when it is a local directory (data with images first:
    it names the VAE as well as the tokenizer)."""
    manifests = local_manifests(s.path for s in cfg.data.sources)
    images = [m for m in manifests if m["kind"] != "text"]
    return (images or manifests or [None])[0]


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
