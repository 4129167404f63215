"""Sharded model and optimizer state through Megatron dist-checkpointing (torch_dist
format), which reshards between TP/PP layouts on load, read without running code from it.

Saves write every file in the calling process (``compat.megatron_core``: Megatron's own
writer forks a process per file and can hang forever when one dies).

Loading never runs code from the checkpoint. The torch_dist format holds pickles: the
global ``.metadata`` (torch's reader calls plain ``pickle.load`` on it), ``common.pt``
(torch.save'd param groups) and Megatron's small byte items inside the ``.distcp`` files
(e.g. ``_extra_state``; torch's planner reads them with ``weights_only=False``). The format
stays (torch's and Megatron's tools read it, and a format of our own would mean
rewriting their writers and resharding readers); what changes is how its pickles are read:
``.metadata`` by an unpickler that admits only the dataclasses torch's checkpoint writer
stores (``_METADATA_GLOBALS``), ``common.pt`` and byte items by torch's weights-only
unpickler (tensors, containers, numbers, strings). Tensor data torch already reads that way.
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from checkpoints import DAMAGED_UNVERIFIED, CheckpointError, layout
from megatron_transfusion.compat.megatron_core import (
    in_process_checkpoint_writer,
    torch_dist_loading_through,
)


def save_sharded(sharded_state_dict: dict, directory: str | Path, background: bool = False):
    """Every rank calls this with its own shards; the directory is created if needed.

    ``background``: plan the save and copy the shards to host memory now, write the files
    from a thread, and return the ``BackgroundWrite`` whose ``finish()`` completes it."""
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    with in_process_checkpoint_writer(copy_to_host=background):
        request = dist_checkpointing.save(
            sharded_state_dict, str(directory), async_sharded_save=background
        )
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
            self._thread = threading.Thread(
                target=self._write, args=(request.async_fn, args), daemon=True
            )
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


# Every global a torch_dist ``.metadata`` refers to (torch 2.14, Megatron-Core 0.16), plus
# torch's dtypes; anything else makes the file unreadable rather than run.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
    },
    "torch.serialization": {"_get_layout"},  # a lookup of torch's layouts by name
    "torch": {"Size"}
    | {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name not in _METADATA_GLOBALS.get(module, ()):
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which checkpoint metadata never does"
            )
        return super().find_class(module, name)


def _reason(error: Exception) -> str:
    """One line of an unpickling error (torch's weights-only errors span a page)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((x for x in lines if "Unsupported global" in x), lines[0] if lines else "")
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def read_metadata(directory: str | Path) -> Metadata:
    """A dist-checkpoint's ``.metadata``, read without running code from it."""
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file '{path}' is missing") from None
    except Exception as e:  # truncated, garbage, or a pickle that would call something
        raise CheckpointError(
            f"checkpoint file '{path}' is not checkpoint metadata ({_reason(e)}); "
            "nothing in it was run"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"checkpoint file '{path}' holds a {type(metadata).__name__}, not checkpoint metadata"
        )
    return metadata


def _load_data(source, where: str):
    """torch.load through torch's weights-only unpickler: data, never code."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{where} cannot be read as data ({_reason(e)}); nothing in it was run"
        ) from None


class _DataOnlyReader(FileSystemReader):
    """torch's reader, handed the ``.metadata`` that ``read_metadata`` read: torch's own
    reading would unpickle freely, and its errors end up inside torch's retry logic."""

    def __init__(self, path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata


def _data_only_planner(directory: Path):
    """Megatron's load planner, reading the byte items of ``directory`` as data only."""

    class DataOnlyPlanner(torch_strategy.MCoreLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            file = directory / self.metadata.storage_data[read_item.storage_index].relative_path
            _load_data(value, f"checkpoint file '{file}' (item '{read_item.dest_index.fqn}')")
            value.seek(0)  # only data: torch's own load of it now runs nothing either
            super().load_bytes(read_item, value)

    return DataOnlyPlanner


class _DataOnlyCommonLoad(TorchCommonLoadStrategy):
    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / "common.pt"
        if not path.is_file():
            raise CheckpointError(f"checkpoint file '{path}' is missing")
        return _load_data(path, f"checkpoint file '{path}'")


def load_sharded(sharded_state_dict: dict, directory: str | Path, part: bool = False) -> dict:
    """Fill this rank's shards from a checkpoint saved in any layout. ``part``: the request
    covers some tensors' shards only (e.g. some layers of a stacked tensor), by design.
    The strategies are given, not chosen by the checkpoint's ``metadata.json``, so it
    cannot select a reader that unpickles freely."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    with torch_dist_loading_through(
        lambda path: _DataOnlyReader(path, metadata), _data_only_planner(directory)
    ):
        try:
            return dist_checkpointing.load(
                sharded_state_dict,
                str(directory),
                sharded_strategy=torch_strategy.TorchDistLoadShardedStrategy(),
                common_strategy=_DataOnlyCommonLoad(),
                validate_access_integrity=not part,
            )
        except CheckpointException as e:  # torch gathers every rank's failure into one
            ours = [
                failure
                for failure, _ in e.failures.values()
                if isinstance(failure, CheckpointError)
            ]
            if ours:
                raise ours[0] from None
            short = _short_files(directory, metadata)
            if (
                short
            ):  # unverified (--no-verify): torch's reader stops at the end with a bare EOFError
                raise CheckpointError(f"checkpoint file {short[0]}; {DAMAGED_UNVERIFIED}") from None
            raise


def _short_files(directory: Path, metadata: Metadata) -> list[str]:
    """'PATH' and what is wrong, for each data file of a dist-checkpoint that is absent or
    shorter than its metadata says."""
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    short = []
    for name, end in sorted(ends.items()):
        path = directory / name
        if not path.is_file():
            short.append(f"'{path}' is missing")
        elif (size := path.stat().st_size) < end:
            short.append(
                f"'{path}' has {size} bytes, '.metadata' places data up to byte {end}: "
                "it is truncated"
            )
    return short


def model_sharded_state_dict(chunks) -> dict:
    """One entry per virtual-pipeline chunk; tensor keys are global, so layouts match."""
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def parameter_shards(
    model_state: dict, params
) -> list[tuple[str, ShardedTensor | ShardedTensorFactory]]:
    """(key in ``model_state``, its sharded entry) of every parameter in ``params``, in order.
    Megatron's sharded state dicts hold the parameters themselves as data (keep_vars)."""
    by_param = {
        id(shard.data): (key, shard)
        for key, shard in model_state.items()
        if isinstance(shard, (ShardedTensor, ShardedTensorFactory))
    }
    missing = [tuple(p.shape) for p in params if id(p) not in by_param]
    if missing:
        raise ValueError(
            f"parameters of shapes {missing[:3]} are missing from the model's sharded state dict"
        )
    return [by_param[id(p)] for p in params]


# Optimizer state on disk, whichever optimizer holds it: Megatron's distributed optimizer's
# "fully_reshardable" layout. Per model parameter, its fp32 master weight and Adam moments,
# shaped and TP-sharded like the parameter, under optimizer.state.<kind>.<parameter key>;
# the param groups (Adam's common step included) beside them. Megatron's distributed
# optimizer reads and writes it itself; the plain Megatron optimizer and DeepSpeed ZeRO
# go through the two functions below, so every engine resumes every other's checkpoints,
# in any TP/PP/DP layout.
OPTIMIZER_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
_MEGATRON_GROUP_IDENTITY = {
    "wd_mult": 1.0,
    "lr_mult": 1.0,
    "is_expert_parallel": False,
    "is_decoupled_lr": False,
}


def optimizer_sharded_state(
    shards: list, states: list[dict[str, torch.Tensor]], param_groups: list[dict], step: int
) -> dict:
    """``states[i]``: "param", "exp_avg", "exp_avg_sq" of the parameter whose sharded entry
    is ``shards[i]``, whole on this rank (empty tensors of its shape when loading)."""
    groups = [
        {
            **_MEGATRON_GROUP_IDENTITY,
            **{k: v for k, v in g.items() if k != "params"},
            "step": float(step),
        }
        for g in param_groups
    ]
    return {
        "optimizer": {"param_groups": groups},
        "param_state_sharding_type": "fully_reshardable",
        "param_state": {
            i: {
                k: make_sharded_optimizer_tensor(shard, state[k], prefix=f"optimizer.state.{k}")
                for k in OPTIMIZER_STATE_KEYS
            }
            for i, (shard, state) in enumerate(zip(shards, states, strict=True))
        },
    }


def optimizer_load_request(shards: list, shapes: list[tuple[int, ...]]) -> dict:
    """What a load asks for: ``optimizer_sharded_state`` with empty tensors of each parameter's
    shape to fill (the param groups and step come from the checkpoint)."""
    states = [
        {k: torch.empty(shape, dtype=torch.float32) for k in OPTIMIZER_STATE_KEYS}
        for shape in shapes
    ]
    return optimizer_sharded_state(shards, states, [], 0)


def loaded_optimizer_state(loaded: dict) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The per-parameter tensors (in the order they were requested) and Adam's step."""
    if loaded.get("param_state_sharding_type") != "fully_reshardable":
        raise ValueError(
            "the checkpoint's optimizer state is not in the fully_reshardable layout "
            f"(found {loaded.get('param_state_sharding_type')!r}); it was written by an "
            "older version of this project"
        )
    steps = {g["step"] for g in loaded["optimizer"]["param_groups"]}
    if len(steps) != 1:
        raise ValueError(
            f"the checkpoint's optimizer param groups disagree on Adam's step: {sorted(steps)}"
        )
    param_state = loaded["param_state"]
    return [param_state[i] for i in range(len(param_state))], int(steps.pop())


def _stored_alike(entry, stored: dict[str, tuple | None]) -> str | None:
    """Why the checkpoint cannot fill ``entry`` (None: it can): absent, or another shape."""
    if isinstance(entry, ShardedObject):
        return None if entry.unique_key in stored else f"has no '{entry.unique_key}'"
    for shard in entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]:
        if shard.key not in stored:
            return f"has no '{shard.key}'"
        if stored[shard.key] != tuple(shard.global_shape):
            return (
                f"holds '{shard.key}' of shape {stored[shard.key]}, the model's is "
                f"{tuple(shard.global_shape)}: it is of another model size"
            )
    return None


def load_model_weights(
    chunks, checkpoint: str | Path, may_be_fresh=lambda name: False
) -> list[str]:
    """Fill model chunks, in any layout, from a training checkpoint's engine state.
    Parameters the checkpoint lacks, or holds in another shape, stay as initialised where
    ``may_be_fresh(name)`` (e.g. patch layers of another kind) and are returned; any other
    is a CheckpointError."""
    engine = layout.engine_dir(Path(checkpoint))
    stored = {
        key: tuple(item.size) if hasattr(item, "size") else None
        for key, item in read_metadata(engine).state_dict_metadata.items()
    }
    request, fresh = {}, []
    for i, chunk in enumerate(chunks):
        wanted = {}
        for name, entry in chunk.sharded_state_dict().items():
            problem = _stored_alike(entry, stored)
            if problem is None:
                wanted[name] = entry
            elif may_be_fresh(name):
                fresh.append(name)
            else:
                raise CheckpointError(f"checkpoint '{checkpoint}' {problem}")
        request[f"chunk{i}"] = wanted
    state = load_sharded({"model": request}, engine, part=bool(fresh))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model"][f"chunk{i}"], strict=not fresh)
    return fresh
