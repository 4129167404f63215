"""``mtf-checkpoint import-hf``: a Hugging Face Llama as a checkpoint of this project.

The run directory written holds the config (the model section derived from
``config.json``, the rest from a preset; ``checkpoint.init_from`` set to the import and
``run.name`` to ``<name>-transfusion``, so ``mtf-train --config <out>/config.yaml`` trains
from it) and one sharded checkpoint of the model alone, marked ``weights_only``: runs start
from it with ``checkpoint.init_from`` in any layout, inference loads it, and resuming it is
refused. ``checkpoint.init_from=hf:DIR`` does the
same conversion in the training run itself, without the copy on disk.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from checkpoints import layout
from checkpoints.huggingface import HFLlama
from checkpoints.publish import publish_checkpoint
from checkpoints.sharded import model_sharded_state_dict, save_sharded
from checkpoints.sources import HF_PREFIX, open_weights
from checkpoints.whole import summarize
from data_prep.tokenizer import Tokenizer
from megatron_transfusion import platform
from megatron_transfusion.config import UserError, config_from_tree, load_config
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed


def hf_overrides(hf: HFLlama) -> list[str]:
    """Dotted overrides that make a config's model section this Hugging Face model's; the
    vocabulary also holds the tokenizer's added specials (image bounds, padding)."""
    fields = hf.model_fields()
    tokenizer = hf.tokenizer_file()
    vocab = hf.vocab_size
    if tokenizer is not None:
        vocab = max(vocab, Tokenizer.load(tokenizer).vocab_size)
    fields["vocab_size"] = vocab
    return [f"model.{k}={'null' if v is None else v}" for k, v in fields.items()]


def import_hf(directory: Path, out: Path, preset: str = "tiny", overrides=()) -> tuple[Path, str]:
    """Write ``out`` (a run directory) from the Hugging Face model in ``directory`` (the
    config: ``preset`` with config.json's model section, or, for this project's Hugging
    Face exports, the exported run's own). Returns the checkpoint written and what stayed
    fresh."""
    out = Path(out)
    if layout.checkpoints_dir(out).exists():
        raise UserError(f"'{out}' already holds checkpoints; choose another --out or remove it")
    source = open_weights(f"{HF_PREFIX}{directory}")
    if source.config is not None:  # an export of this project: its run's config, whole
        cfg = config_from_tree(source.config, overrides)
    else:
        cfg = load_config(preset, [*hf_overrides(HFLlama(directory)), *overrides])
    # The config trains from the import in a run of its own (the import is never resumed).
    cfg.run.name, cfg.run.output_root = f"{out.name}-transfusion", str(out.parent)
    cfg.checkpoint.init_from = str(out)
    # This process writes the checkpoint unsharded; it loads in any layout.
    one_process = config_from_tree(
        cfg.to_dict(),
        [
            "parallel.tensor_parallel=1",
            "parallel.pipeline_parallel=1",
            "parallel.virtual_pipeline=null",
            "parallel.sequence_parallel=false",
        ],
    )
    plat = platform.activate()
    init_distributed(one_process.parallel, plat)
    try:
        chunks = build_model(one_process, plat)
        fresh = source.load(chunks, cfg.model)
        saved = layout.checkpoints_dir(out)
        staging, final = layout.staging_dir(saved, 0), layout.step_dir(saved, 0)
        save_sharded({"model": model_sharded_state_dict(chunks)}, layout.engine_dir(staging))
        layout.run_config_file(out).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        state = {"weights_only": True, "source": source.description, "made_with": source.made_with}
        layout.write_trainer_state(staging, 0, {**state, "untrained": fresh})
        publish_checkpoint(staging, final, keep_last=1)
    finally:
        destroy_distributed()
    return final, summarize(fresh)
