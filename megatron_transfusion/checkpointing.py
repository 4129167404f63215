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

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
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


def load_sharded(sharded_state_dict: dict, directory: str | Path, part: bool = False) -> dict:
    """Fill this rank's shards from a checkpoint saved in any layout. ``part``: the request
    covers some tensors' shards only (e.g. some layers of a stacked tensor), by design."""
    return dist_checkpointing.load(sharded_state_dict, str(directory), validate_access_integrity=not part)


def model_sharded_state_dict(chunks) -> dict:
    """One entry per virtual-pipeline chunk; tensor keys are global, so layouts match."""
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def parameter_shards(model_state: dict, params) -> list[tuple[str, ShardedTensor | ShardedTensorFactory]]:
    """(key in ``model_state``, its sharded entry) of every parameter in ``params``, in order.
    Megatron's sharded state dicts hold the parameters themselves as data (keep_vars)."""
    by_param = {id(shard.data): (key, shard) for key, shard in model_state.items()
                if isinstance(shard, (ShardedTensor, ShardedTensorFactory))}  # fmt: skip
    missing = [tuple(p.shape) for p in params if id(p) not in by_param]
    if missing:
        raise ValueError(f"parameters of shapes {missing[:3]} are missing from the model's sharded state dict")
    return [by_param[id(p)] for p in params]


# Optimizer state on disk, whichever optimizer holds it: Megatron's distributed optimizer's
# "fully_reshardable" layout. Per model parameter, its fp32 master weight and Adam moments,
# shaped and TP-sharded like the parameter, under optimizer.state.<kind>.<parameter key>;
# the param groups (Adam's common step included) beside them. Megatron's distributed
# optimizer reads and writes it itself; the plain Megatron optimizer and DeepSpeed ZeRO
# go through the two functions below, so every engine resumes every other's checkpoints,
# in any TP/PP/DP layout.
OPTIMIZER_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
_MEGATRON_GROUP_IDENTITY = {"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False}


def optimizer_sharded_state(shards: list, states: list[dict[str, torch.Tensor]],
                            param_groups: list[dict], step: int) -> dict:  # fmt: skip
    """``states[i]``: "param", "exp_avg", "exp_avg_sq" of the parameter whose sharded entry
    is ``shards[i]``, whole on this rank (empty tensors of its shape when loading)."""
    groups = [{**_MEGATRON_GROUP_IDENTITY, **{k: v for k, v in g.items() if k != "params"}, "step": float(step)}
              for g in param_groups]  # fmt: skip
    return {
        "optimizer": {"param_groups": groups},
        "param_state_sharding_type": "fully_reshardable",
        "param_state": {
            i: {k: make_sharded_optimizer_tensor(shard, state[k], prefix=f"optimizer.state.{k}")
                for k in OPTIMIZER_STATE_KEYS}  # fmt: skip
            for i, (shard, state) in enumerate(zip(shards, states, strict=True))
        },
    }


def optimizer_load_request(shards: list, shapes: list[tuple[int, ...]]) -> dict:
    """What a load asks for: ``optimizer_sharded_state`` with empty tensors of each parameter's
    shape to fill (the param groups and step come from the checkpoint)."""
    states = [{k: torch.empty(shape, dtype=torch.float32) for k in OPTIMIZER_STATE_KEYS} for shape in shapes]
    return optimizer_sharded_state(shards, states, [], 0)


def loaded_optimizer_state(loaded: dict) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The per-parameter tensors (in the order they were requested) and Adam's step."""
    if loaded.get("param_state_sharding_type") != "fully_reshardable":
        raise ValueError("the checkpoint's optimizer state is not in the fully_reshardable layout "
                         f"(found {loaded.get('param_state_sharding_type')!r}); it was written by an "
                         "older version of this project")  # fmt: skip
    steps = {g["step"] for g in loaded["optimizer"]["param_groups"]}
    if len(steps) != 1:
        raise ValueError(f"the checkpoint's optimizer param groups disagree on Adam's step: {sorted(steps)}")
    param_state = loaded["param_state"]
    return [param_state[i] for i in range(len(param_state))], int(steps.pop())


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
