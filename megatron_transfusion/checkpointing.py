"""Sharded model state through Megatron dist-checkpointing (torch_dist format), which
reshards between TP/PP layouts on load.

Megatron's torch_dist writer forks one process per file bucket and waits on a queue with
no timeout, so a child that dies leaves the save hanging forever (seen on loaded CPU
machines). Here the buckets are written in the calling process, and the results travel
through a plain queue instead of a spawned multiprocessing Manager: a save either
finishes or raises, and no helper process is started.
"""

from __future__ import annotations

import queue
from pathlib import Path
from unittest import mock

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync


class _InProcessWriter(FileSystemWriterAsync):
    @staticmethod
    def write_preloaded_data_multiproc(transform_list, use_msc, rank, write_buckets, global_results_queue):
        results, done = queue.Queue(), queue.Queue()  # the interfaces the bucket writer reports to
        outcome: dict | Exception = {}
        for index, bucket in enumerate(write_buckets):
            done.put(index)
            FileSystemWriterAsync.write_preloaded_data(
                transform_list, index, bucket, results, done, True, use_msc=use_msc
            )
            index, written = results.get()
            if isinstance(written, Exception):
                outcome = written
                break
            outcome[index] = written
        global_results_queue.put(outcome)


def save_sharded(sharded_state_dict: dict, directory: str | Path) -> None:
    """Every rank calls this with its own shards; the directory is created if needed."""
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    with (
        mock.patch.object(torch_strategy, "FileSystemWriterAsync", _InProcessWriter),
        mock.patch.object(filesystem_async, "_get_write_results_queue", queue.Queue),
    ):
        dist_checkpointing.save(sharded_state_dict, str(directory))


def load_sharded(sharded_state_dict: dict, directory: str | Path) -> dict:
    """Fill this rank's shards from a checkpoint saved in any layout."""
    return dist_checkpointing.load(sharded_state_dict, str(directory))


def model_sharded_state_dict(chunks) -> dict:
    """One entry per virtual-pipeline chunk; tensor keys are global, so layouts match."""
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_model(chunks, directory: str | Path) -> None:
    state = load_sharded(model_sharded_state_dict(chunks), directory)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"])


def run_config_path(checkpoint: str | Path) -> Path:
    """runs/<name>/checkpoints/step_N -> runs/<name>/config.yaml (the trainer writes it)."""
    path = Path(checkpoint).resolve().parent.parent / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no config.yaml next to the checkpoints of '{checkpoint}' (expected {path})")
    return path


def load_trained_model(chunks, checkpoint: str | Path) -> None:
    """Fill model chunks, in any layout, from a training checkpoint's engine state."""
    state = load_sharded({"model": model_sharded_state_dict(chunks)}, Path(checkpoint) / "engine")
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model"][f"chunk{i}"])
