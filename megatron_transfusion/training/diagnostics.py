"""What a run writes, when asked, to see where its time and memory go;
every rank writes its own files:

    <run dir>/profiles/steps_A-B/rank_N.pt.trace.json  profile.steps=[A, B]: torch.profiler's
        trace of those steps, Chrome trace JSON (Perfetto, chrome://tracing; named as
        TensorBoard's profiler plugin expects)
    <run dir>/profiles/memory_step_B/rank_N.pickle  profile.memory_snapshot: the CUDA
        allocator's history after step B (https://pytorch.org/memory_viz draws it)
    <run dir>/profiles/memory_oom_step_S/rank_N.pickle  ... at an out-of-memory error in step S

As torchtitan's profiling does: one warm-up step before the traced ones (the profiler's
start-up stays out of the trace), and allocator history from the first step, so that a
snapshot shows how the peak came about.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerAction

from megatron_transfusion.config import ProfileConfig
from megatron_transfusion.platform import Platform


class Profiling:
    """``profile.steps`` and ``profile.memory_snapshot`` on this rank, from step ``done``
    on: ``step_done(step)`` after every training step, ``out_of_memory(step)`` where one
    ran out of memory, ``close()`` at the end. ``say`` prints a line once (rank 0)."""

    def __init__(self, cfg: ProfileConfig, run_dir: Path, plat: Platform, done: int, say: Callable):
        self.directory = run_dir / "profiles"
        self.rank = dist.get_rank()
        self.first, self.last = cfg.steps or (0, 0)
        self.done = done
        self.plat = plat
        self.snapshots = cfg.memory_snapshot and plat.record_memory_history()
        if cfg.memory_snapshot and not self.snapshots:
            say("profile.memory_snapshot: memory snapshots need CUDA; none on this CPU run")
        self.say = say
        self._profiler = None
        if cfg.steps and done < self.last:
            self._profiler = torch.profiler.profile(
                activities=plat.profiler_activities(),
                schedule=self._action,
                on_trace_ready=self._save_trace,
                record_shapes=True,
            )
            self._profiler.step_num = done + 1  # labels "ProfilerStep#N" as the log counts
            self._profiler.start()

    def _action(self, _step_num: int) -> ProfilerAction:
        """For the step about to run, counted by the trainer (torch's count starts at 0
        wherever the profiler was made, a resumed run's step is later)."""
        step = self.done + 1
        if step == self.first - 1:
            return ProfilerAction.WARMUP
        if self.first <= step < self.last:
            return ProfilerAction.RECORD
        return ProfilerAction.RECORD_AND_SAVE if step == self.last else ProfilerAction.NONE

    def _save_trace(self, profiler: torch.profiler.profile) -> None:
        steps = f"steps_{self.first}-{self.last}"
        path = self.directory / steps / f"rank_{self.rank}.pt.trace.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(path))
        self.say(f"profile: steps {self.first}-{self.last} traced into {path.parent}")

    def step_done(self, step: int) -> None:
        self.done = step
        if self._profiler is not None:
            self._profiler.step()
        if self.snapshots and step == self.last:
            self._snapshot(f"memory_step_{step}")

    def out_of_memory(self, step: int) -> None:
        if self.snapshots:
            self._snapshot(f"memory_oom_step_{step}")

    def _snapshot(self, name: str) -> None:
        path = self.directory / name / f"rank_{self.rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.plat.dump_memory_snapshot(path)
        self.say(f"profile: memory snapshot written into {path.parent}")

    def close(self) -> None:
        """Stops a trace still running (a run that ended inside the profiled steps saves
        what it has)."""
        if self._profiler is not None:
            self._profiler.stop()
