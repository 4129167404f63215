"""What a run writes, when asked, to see where its time and memory go and where it hangs;
every rank writes its own files:

    <run dir>/profiles/steps_A-B/rank_N.pt.trace.json  profile.steps=[A, B]: torch.profiler's
        trace of those steps, Chrome trace JSON (Perfetto, chrome://tracing; named as
        TensorBoard's profiler plugin expects)
    <run dir>/profiles/memory_step_B/rank_N.pickle  profile.memory_snapshot: the CUDA
        allocator's history after step B (https://pytorch.org/memory_viz draws it)
    <run dir>/profiles/memory_oom_step_S/rank_N.pickle  ... at an out-of-memory error in step S
    <run dir>/hangs/rank_N.txt  every thread's Python stack, each time no step has finished
        for distributed.hang_watchdog_minutes

As torchtitan's profiling does: one warm-up step before the traced ones (the profiler's
start-up stays out of the trace), and allocator history from the first step, so that a
snapshot shows how the peak came about.
"""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
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


class HangWatchdog:
    """A thread that, when no training step has finished for ``minutes``, prints every
    thread's Python stack of this rank (faulthandler) to stderr and appends it to
    ``run_dir/hangs/rank_N.txt``, once per stall. Every rank runs one, so a hang shows
    where each rank is: the one that is late, and the others waiting in a collective.
    An evaluation or a save runs inside ``phase(name)``: its own clock, and a dump that
    names it, so that a long one reads as what it is (and a hung one is still caught)."""

    def __init__(self, minutes: float, run_dir: Path, done: int):
        self.seconds = minutes * 60
        self.rank = dist.get_rank()
        self.path = run_dir / "hangs" / f"rank_{self.rank}.txt"
        self.step, self._phase = done, None
        self._since, self._stall = time.monotonic(), 0  # a new stall: a new number
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        if self.seconds > 0:
            self._thread.start()

    def _restart(self) -> None:
        self._since, self._stall = time.monotonic(), self._stall + 1

    def step_done(self, step: int) -> None:
        self.step = step
        self._restart()

    @contextmanager
    def phase(self, name: str):
        self._phase = name
        self._restart()
        try:
            yield
        finally:
            self._phase = None
            self._restart()

    def _watch(self) -> None:
        dumped = None  # the stall last dumped
        while not self._stop.wait(min(self.seconds / 10, 30.0)):
            stalled, stall = time.monotonic() - self._since, self._stall
            if stalled >= self.seconds and dumped != stall:
                dumped = stall
                self._dump(stalled, self._phase)

    def _dump(self, stalled: float, phase: str | None) -> None:
        if phase is None:
            what = (
                f"has finished no training step for {stalled / 60:.2f} min "
                f"(the last was step {self.step})"
            )
        else:
            what = f"has been in the {phase} after step {self.step} for {stalled / 60:.2f} min"
        header = f"hang watchdog: rank {self.rank} {what}; its threads' stacks:\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as file:
            file.write(header)
            file.flush()
            faulthandler.dump_traceback(file, all_threads=True)
        os.write(2, header.encode())  # stderr's descriptor: written even mid-print
        faulthandler.dump_traceback(2, all_threads=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
