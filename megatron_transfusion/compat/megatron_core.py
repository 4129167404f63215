"""Patches on Megatron-Core's private internals (written for the pinned Megatron-Core 0.16.1).

Megatron is imported inside the functions: the CPU view must be in place before its
modules are first imported (``give_megatron_torch``), so importing this module imports
none of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import queue
import sys
import types

from megatron_transfusion.compat import patcher, replaced

WRITTEN_FOR = "0.16.1"
patch = patcher("megatron-core", WRITTEN_FOR, __name__)


# ---- A CPU view of torch for Megatron's modules -------------------------------------------


def _give_torch(module: types.ModuleType, torch_view: types.ModuleType) -> None:
    import torch

    if getattr(module, "torch", None) is torch:
        module.torch = torch_view
    if module.__name__ == "megatron.core.tensor_parallel.random":
        # These go through the CUDA module's lazy-init machinery, which a module proxy cannot reach.
        module._get_cuda_rng_state = torch_view.cuda.get_rng_state
        module._set_cuda_rng_state = torch_view.cuda.set_rng_state


class _GivingLoader(importlib.abc.Loader):
    def __init__(self, inner, torch_view: types.ModuleType):
        self.inner, self.torch_view = inner, torch_view

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _give_torch(module, self.torch_view)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Gives the view to megatron modules imported later."""

    def __init__(self, torch_view: types.ModuleType):
        self.torch_view = torch_view

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _GivingLoader(spec.loader, self.torch_view)
        return spec


@patch
def give_megatron_torch(torch_view: types.ModuleType) -> None:
    """Every ``megatron.*`` module, imported now or later, sees ``torch_view`` as its ``torch``.

    Megatron-Core calls torch's CUDA module directly in the handful of places the CPU path
    goes through; replacing its modules' ``torch`` global (and the two private RNG helpers
    of ``tensor_parallel.random`` that bypass it) scopes the platform's CPU stand-ins to
    Megatron, so torch itself and every other library keep the real CUDA module."""
    sys.meta_path.insert(0, _MegatronImportHook(torch_view))
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.") and module is not None:
            _give_torch(module, torch_view)


# ---- Checkpoint writing and reading ---------------------------------------------------------


@functools.cache
def _in_process_writer(copy_to_host: bool) -> type:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    class InProcessWriter(FileSystemWriterAsync):
        @staticmethod
        def write_preloaded_data_multiproc(
            transform_list, use_msc, rank, write_buckets, global_results_queue
        ):
            results, done = (
                queue.Queue(),
                queue.Queue(),
            )  # the interfaces the bucket writer reports to
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

    class StagingWriter(InProcessWriter):
        """Host copies of everything to write: Megatron's ``.to("cpu")`` is a no-op for CPU
        tensors, which training would then overwrite under a background write."""

        @staticmethod
        def preload_tensors(write_buckets, non_blocking=True):
            return [
                (
                    file_name,
                    key,
                    (data, [(item, t.detach().to("cpu", copy=True)) for item, t in tensors]),
                )
                for file_name, key, (data, tensors) in write_buckets
            ]

    return StagingWriter if copy_to_host else InProcessWriter


@patch
@contextlib.contextmanager
def in_process_checkpoint_writer(copy_to_host: bool):
    """Inside the block, torch_dist saves write every file bucket in the calling process.

    Megatron's torch_dist writer forks one process per file bucket and waits on a queue
    with no timeout, so a child that dies leaves the save hanging forever (seen on loaded
    CPU machines). Here the buckets are written in the calling process, and the results
    travel through a plain queue instead of a spawned multiprocessing Manager: a save
    either finishes or raises, and no helper process is started. ``copy_to_host``: for a
    background write, copy every tensor, CPU ones included, when the save is planned."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    with (
        replaced(torch_strategy, "FileSystemWriterAsync", _in_process_writer(copy_to_host)),
        replaced(filesystem_async, "_get_write_results_queue", queue.Queue),
    ):
        yield


@patch
@contextlib.contextmanager
def torch_dist_loading_through(reader, planner_class: type):
    """Inside the block, torch_dist loads use the given reader and load planner.

    They read through ``reader(path)`` and plan with ``planner_class`` (a subclass of
    Megatron's ``MCoreLoadPlanner``): ``TorchDistLoadShardedStrategy`` builds its
    filesystem reader and load planner itself, and no argument takes others; the
    checkpoint loader needs its own, which read the checkpoint's pickles as data only."""
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    with (
        replaced(
            torch_strategy,
            "_get_filesystem_reader",
            lambda path, cache_metadata=False: reader(path),
        ),
        replaced(torch_strategy, "MCoreLoadPlanner", planner_class),
    ):
        yield


# ---- The distributed optimizer ----------------------------------------------------------------


@patch
def load_distributed_optimizer_state(optimizer, state: dict, distributed_optimizers: list) -> None:
    """``optimizer.load_state_dict(state)``, keeping torch AdamW's per-parameter steps apart.

    Without Apex/TE the distributed optimizer wraps torch AdamW, which keeps a ``step``
    tensor per parameter. Megatron saves one common step and (0.16.1) then (a) tries to
    copy a per-parameter step that the fully reshardable format never stored, and (b)
    hands every parameter the same step tensor, which torch increments once per parameter
    per update. Each of ``distributed_optimizers`` (those inside ``optimizer``) keeps each
    parameter's step through (a), and gets its step tensors un-shared for (b)."""
    for opt in distributed_optimizers:
        set_states = opt._set_main_param_and_optimizer_states

        def keep_step(model_param, tensors, opt=opt, set_states=set_states):
            group, order = opt.model_param_group_index_map[model_param]
            current = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            return set_states(
                model_param, {**tensors, **({"step": current["step"]} if "step" in current else {})}
            )

        opt._set_main_param_and_optimizer_states = keep_step
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in distributed_optimizers:
            del opt._set_main_param_and_optimizer_states
    for opt in distributed_optimizers:
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()
