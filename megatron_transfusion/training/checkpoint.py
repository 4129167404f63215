"""Run checkpoints: written under a temporary name, published atomically, pruned.

    checkpoints/
      step_00000100/          a complete checkpoint
        engine/               model + optimizer (dist-checkpointing, one layout for every engine)
        rng/rank_00000.safetensors   each rank's random generators
        trainer.json          step, counters, data-loader state (identical on every rank)
        manifest.json         size and SHA-256 of every file above, checked before loading
      latest                  the name of the newest complete checkpoint

A step directory only exists once every rank has finished writing into its temporary
twin and its manifest is written there, and ``latest`` only moves after that (rank 0
renames both), so a crash at any moment leaves the previous checkpoint loadable. The
engine state's pickles are read without running code (``checkpointing.load_sharded``);
everything else is JSON and safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_transfusion.checkpointing import verify_checkpoint, write_manifest
from megatron_transfusion.training.engine import Engine

LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    if not (path / "trainer.json").exists():
        raise FileNotFoundError(f"'{pointer}' names '{path}', which is not a complete checkpoint")
    return path


def resolve_resume(directory: Path, resume: str | None) -> Path | None:
    """``auto``: the latest complete checkpoint if any; a path: exactly that; None: none."""
    if resume is None or resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(directory)
    path = Path(resume)
    if not (path / "trainer.json").exists():
        raise FileNotFoundError(f"checkpoint '{path}' is missing or incomplete (no trainer.json)")
    return path


class PendingCheckpoint:
    """A checkpoint whose files may still be in flight; ``publish()`` completes it."""

    def __init__(self, directory: Path, step: int, trainer_state: dict, keep_last: int, write):
        self.directory, self.step, self.trainer_state, self.keep_last = directory, step, trainer_state, keep_last
        self.write = write  # the engine's BackgroundWrite, or None once written

    def ready(self) -> bool:
        """Collective: every rank's files are written, so ``publish()`` will not wait."""
        done = torch.tensor([int(self.write is None or self.write.done())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done)

    def publish(self) -> Path:
        """Collective: finish the writes, then rename the temporary directory and move
        ``latest``. Returns the published checkpoint directory."""
        if self.write is not None:
            self.write.finish()
        rank = dist.get_rank()
        final, tmp = self.directory / step_name(self.step), self.directory / f".tmp-{step_name(self.step)}"
        if rank == 0:
            (tmp / "trainer.json").write_text(json.dumps({"step": self.step, **self.trainer_state}, indent=1))
        dist.barrier()  # every rank's files are on disk
        write_manifest(tmp)
        if rank == 0:
            if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
            pointer = self.directory / f".{LATEST}.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.directory / LATEST)
            _prune(self.directory, self.keep_last)
        dist.barrier()
        return final


def begin_checkpoint(directory: Path, step: int, engine: Engine, trainer_state: dict,
                     rng_state: dict[str, torch.Tensor], keep_last: int,
                     background: bool = False) -> PendingCheckpoint:  # fmt: skip
    """Collective. Everything is captured now; with ``background`` the engine's files are
    written by a thread while training goes on, and nothing is published before
    ``publish()``, so a crash meanwhile leaves the previous checkpoint in place."""
    rank = dist.get_rank()
    tmp = directory / f".tmp-{step_name(step)}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    write = engine.save(tmp / "engine", background=background)
    save_file(rng_state, tmp / "rng" / f"rank_{rank:05d}.safetensors")
    return PendingCheckpoint(directory, step, trainer_state, keep_last, write)


def save_checkpoint(directory: Path, step: int, engine: Engine, trainer_state: dict,
                    rng_state: dict[str, torch.Tensor], keep_last: int) -> Path:  # fmt: skip
    """Collective: write and publish. Returns the published checkpoint directory."""
    return begin_checkpoint(directory, step, engine, trainer_state, rng_state, keep_last).publish()


def _prune(directory: Path, keep_last: int) -> None:
    complete = sorted(p for p in directory.glob("step_*") if (p / "trainer.json").exists())
    for old in complete[:-keep_last]:
        shutil.rmtree(old)


def load_checkpoint(path: Path, engine: Engine, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Collective. Returns (trainer state, this rank's RNG state or None if the checkpoint
    was written by a different number of ranks). ``verify``: check every file against the
    manifest first."""
    if verify:
        verify_checkpoint(path)
    engine.load(path / "engine")
    trainer_state = json.loads((path / "trainer.json").read_text())
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.safetensors"
    same_world = len(list((path / "rng").glob("rank_*.safetensors"))) == dist.get_world_size()
    return trainer_state, load_file(rng_file) if same_world else None
