"""A run directory's checkpoints: the only place their file names are spelled.

    <run>/config.yaml                   the run's config (the trainer writes it; a copy in
                                        the checkpoints directory where that is elsewhere)
    <run>/checkpoints/
      step_00000100/                    a complete checkpoint
        engine/                         model + optimizer (dist-checkpointing, one layout
                                        for every engine)
        rng/rank_00000.safetensors      each rank's random generators
        trainer.json                    step, counters, data-loader state (identical on every rank)
        manifest.json                   size and SHA-256 of every file above, checked before loading
      .tmp-step_00000200/               a checkpoint being written (renamed when complete)
      latest                            the name of the newest complete checkpoint

A checkpoint is complete once it has its ``trainer.json`` (written last, before the rename).
A checkpoint written by ``mtf-checkpoint import-hf`` holds the model alone (``weights_only``
in its trainer.json): runs start from it (``checkpoint.init_from``), they do not resume it.

A Hugging Face export (``mtf-checkpoint export --format hf``) is a directory
``transformers`` loads as a ``LlamaForCausalLM``, plus what makes it a Transfusion model:

    <dir>/config.json, model*.safetensors, tokenizer.json ...   the text model, Hugging Face's
    <dir>/transfusion.json              the run's config, special tokens, tokenizer and VAE
    <dir>/transfusion.safetensors       the patch layers
    <dir>/manifest.json                 size and SHA-256 of every file above
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.yaml"
LATEST = "latest"
ENGINE = "engine"
RNG = "rng"
TRAINER_STATE = "trainer.json"
MANIFEST = "manifest.json"

HF_TRANSFUSION = "transfusion.json"
HF_PATCH_LAYERS = "transfusion.safetensors"

CHECKPOINT_KINDS = (
    "a consolidated .safetensors file (mtf-checkpoint export), a Hugging Face export "
    f"directory (with {HF_TRANSFUSION}), a checkpoint directory "
    f"(<run>/{CHECKPOINTS}/step_N), a checkpoints directory with '{LATEST}', or a run directory"
)


# ---- The run directory ---------------------------------------------------------------------


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def run_config_file(run_dir: Path) -> Path:
    return run_dir / RUN_CONFIG


def kept_elsewhere(checkpoints: Path, run_dir: Path) -> bool:
    """Whether a checkpoints directory (``checkpoint.directory``) is outside its run's."""
    return checkpoints.resolve().parent != run_dir.resolve()


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Starting over (resume "none") where a run already is: its directory is renamed to
    ``<run>.before-<UTC time>`` rather than mixed with the new run, whose logs would
    append to it and whose crash before its first save would resume the old checkpoints.
    Returns the new name; None where there was no run."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = run_dir.with_name(f"{run_dir.name}.before-{stamp}")
    for n in itertools.count(1):
        if not aside.exists():
            break
        aside = run_dir.with_name(f"{run_dir.name}.before-{stamp}-{n}")
    run_dir.rename(aside)
    return aside


def run_config_path(checkpoint: str | Path) -> Path:
    """runs/<name>/checkpoints/step_N -> runs/<name>/config.yaml (the trainer writes it);
    for checkpoints kept outside the run directory (``checkpoint.directory``), the copy
    the trainer writes into that directory."""
    checkpoints = Path(checkpoint).resolve().parent
    for path in (checkpoints / RUN_CONFIG, run_config_file(checkpoints.parent)):
        if path.exists():
            return path
    raise FileNotFoundError(
        f"no {RUN_CONFIG} next to the checkpoints of '{checkpoint}' (expected {path})"
    )


# ---- The checkpoints directory --------------------------------------------------------------


def step_name(step: int) -> str:
    """A checkpoint's directory name; also names what is made from it (samples, evaluations)."""
    return f"step_{step:08d}"


def step_dir(directory: Path, step: int) -> Path:
    return directory / step_name(step)


def staging_dir(directory: Path, step: int) -> Path:
    """Where step ``step``'s checkpoint is written before it is published."""
    return directory / f".tmp-{step_name(step)}"


def latest_file(directory: Path) -> Path:
    return directory / LATEST


def complete_checkpoints(directory: Path) -> list[Path]:
    """Every complete checkpoint in ``directory``, oldest first."""
    return sorted(p for p in directory.glob("step_*") if (p / TRAINER_STATE).exists())


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = latest_file(directory)
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"'{pointer}' names '{path}', which is not a complete checkpoint")
    return path


def resolve_resume(directory: Path, resume: str | None) -> Path | None:
    """``auto``: the latest complete checkpoint if any; a path: exactly that; None: none."""
    if resume is None or resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(directory)
    path = Path(resume)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(
            f"checkpoint '{path}' is missing or incomplete (no {TRAINER_STATE})"
        )
    return path


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint a user path names; FileNotFoundError saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if is_hf_export(path):
        return path
    for candidate in (path, checkpoints_dir(path)):
        if latest_file(candidate).is_file():
            candidate = candidate / latest_file(candidate).read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    raise FileNotFoundError(f"'{path}' is not a checkpoint: expected {CHECKPOINT_KINDS}")


def is_hf_export(path: Path) -> bool:
    return (path / HF_TRANSFUSION).is_file()


# ---- One checkpoint -------------------------------------------------------------------------


def engine_dir(checkpoint: Path) -> Path:
    return checkpoint / ENGINE


def rng_dir(checkpoint: Path) -> Path:
    return checkpoint / RNG


def rng_file(checkpoint: Path, rank: int) -> Path:
    return rng_dir(checkpoint) / f"rank_{rank:05d}.safetensors"


def saved_ranks(checkpoint: Path) -> int:
    """How many ranks wrote ``checkpoint`` (one RNG file each)."""
    return len(list(rng_dir(checkpoint).glob("rank_*.safetensors")))


def manifest_file(checkpoint: Path) -> Path:
    return checkpoint / MANIFEST


def write_trainer_state(checkpoint: Path, step: int, state: dict) -> None:
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": step, **state}, indent=1))


def read_trainer_state(checkpoint: Path) -> dict:
    """``step`` and the trainer's counters and data-loader state."""
    return json.loads((checkpoint / TRAINER_STATE).read_text())
