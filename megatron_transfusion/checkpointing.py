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
import threading
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


class _StagingWriter(_InProcessWriter):
    """For background writes: host copies of everything to write. Megatron's ``.to("cpu")``
    is a no-op for CPU tensors, which training would then overwrite under the write."""

    @staticmethod
    def preload_tensors(write_buckets, non_blocking=True):
        return [(file_name, key, (data, [(item, t.detach().to("cpu", copy=True)) for item, t in tensors]))
                for file_name, key, (data, tensors) in write_buckets]  # fmt: skip


def save_sharded(sharded_state_dict: dict, directory: str | Path, background: bool = False):
    """Every rank calls this with its own shards; the directory is created if needed.

    ``background``: plan the save and copy the shards to host memory now, write the files
    from a thread, and return the ``BackgroundWrite`` whose ``finish()`` completes it."""
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    with (
        mock.patch.object(torch_strategy, "FileSystemWriterAsync", _StagingWriter if background else _InProcessWriter),
        mock.patch.object(filesystem_async, "_get_write_results_queue", queue.Queue),
    ):
        request = dist_checkpointing.save(sharded_state_dict, str(directory), async_sharded_save=background)
    return BackgroundWrite(request) if background else None


class BackgroundWrite:
    """A save whose files a thread is writing from host copies taken at save time."""

    def __init__(self, request):
        self._finalize = request.finalize_fns
        self._error: BaseException | None = None
        self._thread = None
        if request.async_fn is not None:  # None: nothing to write on this rank
            args = list(request.async_fn_args)
            args[1] = request.preload_fn()  # the host copies, before training moves on
            self._thread = threading.Thread(target=self._write, args=(request.async_fn, args), daemon=True)
            self._thread.start()

    def _write(self, write, args) -> None:
        try:
            write(*args)
        except BaseException as e:  # re-raised by finish() in the training thread
            self._error = e

    def done(self) -> bool:
        """This rank's files are written (or failed); finish() will not block on them."""
        return self._thread is None or not self._thread.is_alive()

    def finish(self) -> None:
        """Collective: wait for this rank's files, then write the checkpoint metadata."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError("writing the checkpoint in the background failed") from self._error
        for finalize in self._finalize:
            finalize()


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
