"""What a training run saves and resumes from: the engine's model and optimizer state,
every rank's random generators and the trainer's state (step, counters, data position).

A checkpoint is written into its staging directory and published atomically
(``publish.publish_checkpoint``). The engine state's pickles are read without running
code (``sharded.load_sharded``); everything else is JSON and safetensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from checkpoints import CheckpointError, layout
from checkpoints.publish import publish_checkpoint, verify_checkpoint
from megatron_transfusion.training.engine import Engine


class PendingCheckpoint:
    """A checkpoint whose files may still be in flight; ``publish()`` completes it."""

    def __init__(self, directory: Path, step: int, trainer_state: dict, keep_last: int, write):
        self.directory, self.step, self.trainer_state, self.keep_last = (
            directory,
            step,
            trainer_state,
            keep_last,
        )
        self.write = write  # the engine's BackgroundWrite, or None once written

    def ready(self) -> bool:
        """Collective: every rank's files are written, so ``publish()`` will not wait."""
        done = torch.tensor([int(self.write is None or self.write.done())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done)

    def publish(self) -> Path:
        """Collective: finish the writes, then publish the checkpoint and move ``latest``.
        Returns the published checkpoint directory."""
        if self.write is not None:
            self.write.finish()
        staging, final = (
            layout.staging_dir(self.directory, self.step),
            layout.step_dir(self.directory, self.step),
        )
        if dist.get_rank() == 0:
            layout.write_trainer_state(staging, self.step, self.trainer_state)
        dist.barrier()  # every rank's files are on disk
        publish_checkpoint(staging, final, self.keep_last)
        return final


def begin_checkpoint(
    directory: Path,
    step: int,
    engine: Engine,
    trainer_state: dict,
    rng_state: dict[str, torch.Tensor],
    keep_last: int,
    background: bool = False,
) -> PendingCheckpoint:
    """Collective. Everything is captured now; with ``background`` the engine's files are
    written by a thread while training goes on, and nothing is published before
    ``publish()``, so a crash meanwhile leaves the previous checkpoint in place."""
    rank = dist.get_rank()
    staging = layout.staging_dir(directory, step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier attempt
        layout.rng_dir(staging).mkdir(parents=True)
    dist.barrier()
    write = engine.save(layout.engine_dir(staging), background=background)
    save_file(rng_state, layout.rng_file(staging, rank))
    return PendingCheckpoint(directory, step, trainer_state, keep_last, write)


def load_checkpoint(
    path: Path, engine: Engine, verify: bool = True
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Collective. Returns (trainer state, this rank's RNG state or None if the checkpoint
    was written by a different number of ranks). ``verify``: check every file against the
    manifest first."""
    trainer_state = layout.read_trainer_state(path)
    if trainer_state.get("weights_only"):
        raise CheckpointError(
            f"'{path}' holds model weights only ({trainer_state.get('source', 'imported')}), "
            f"not a run to resume: start one from it with checkpoint.init_from={path}"
        )
    if verify:
        verify_checkpoint(path)
    engine.load(layout.engine_dir(path))
    same_world = layout.saved_ranks(path) == dist.get_world_size()
    return trainer_state, load_file(layout.rng_file(path, dist.get_rank())) if same_world else None
