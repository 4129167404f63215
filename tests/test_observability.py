"""What a training run tells about itself, over real processes: the W&B run (offline) and
its continuation after a resume, the progress fields, profiler traces per rank, memory
snapshots on CPU, and a hang: every rank's stacks, then the collective timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_loader import prepare
from tests.test_trainer import TRAIN, losses, overrides, run

OFFLINE = {"WANDB_MODE": "offline"}  # never the network, whatever the config says


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("observability-data")
    prepare(root)
    return root


@pytest.fixture(scope="module")
def observed(data_root, tmp_path_factory):
    """2 ranks, 4 steps with everything on, then resumed to step 6: (run dir, outputs)."""
    root = tmp_path_factory.mktemp("observed")
    watch = ["wandb.mode=offline", "wandb.tags=[smoke]", "profile.memory_snapshot=true"]
    first = run(2, overrides(data_root, root, 4, *watch, "profile.steps=[2, 3]"), env=OFFLINE)
    second = run(2, overrides(data_root, root, 6, *watch), env=OFFLINE)
    return root / "tiny", first, second


def wandb_records(path: Path):
    """The records of an offline W&B run file, decoded by wandb's own protobuf classes.
    The file is a LevelDB log (what ``wandb sync`` reads; wandb ships no Python reader of
    it): after a 7-byte header, 32 KiB blocks of chunks, each a 7-byte header (CRC, little
    endian length, type: 1 whole, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    position, pending = header, b""
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a header
            position += block - position % block
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        pending += data[position + header : position + header + length]
        position += header + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""
        elif kind == 0:  # padding
            pending = b""


def wandb_runs(run_dir: Path) -> list[tuple[str, dict[int, dict]]]:
    """Each offline W&B run directory's run id and history (step -> values), oldest first."""
    runs = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        (file,) = directory.glob("run-*.wandb")
        run_id, history = None, {}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id, tags = record.run.run_id, list(record.run.tags)
                assert record.run.display_name == "tiny" and tags == ["smoke"]
            elif kind == "history":
                history[record.history.step.num] = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
        runs.append((run_id, history))
    return runs


def test_the_wandb_run_holds_the_logged_metrics_and_a_resume_continues_it(observed):
    run_dir, _, _ = observed
    runs = wandb_runs(run_dir)
    assert len(runs) == 2, "one offline run directory per process, both in the run directory"
    (first_id, first), (second_id, second) = runs
    assert first_id == second_id == (run_dir / "logs" / "wandb_run_id").read_text()
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6]
    logged = losses(run_dir.parent)
    for step, values in {**first, **second}.items():
        assert (values["loss"], values["lm_loss"], values["diffusion_loss"]) == logged[step]
        assert {"lr", "grad_norm", "tokens_per_second", "data/text/tokens"} <= set(values)


def test_progress_fields_are_consistent(observed):
    run_dir, _, _ = observed
    metrics = (run_dir / "logs" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in metrics.splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens_seen"] for r in records] == [512 * r["step"] for r in records]
    elapsed = [r["elapsed_seconds"] for r in records]
    assert all(0 < a < b for a, b in zip(elapsed, elapsed[1:])), elapsed  # across the resume
    ends = [False, False, False, True, False, True]  # each run's last step
    assert [r["eta_seconds"] == 0 for r in records] == ends
    assert all(0 < r["memory_gib"] < 2 for r in records)


def test_profiled_steps_leave_one_trace_per_rank(observed):
    """Steps 2 and 3 (step 1 only warms the profiler up), each rank's own ops in them: the
    model's matmuls, the gradient all-reduce over gloo, the optimizer's update."""
    run_dir, first, _ = observed
    traces = sorted((run_dir / "profiles").rglob("*.json"))
    assert [p.relative_to(run_dir).as_posix() for p in traces] == [
        "profiles/steps_2-3/rank_0.pt.trace.json",
        "profiles/steps_2-3/rank_1.pt.trace.json",
    ]
    for trace in traces:
        names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
        steps = sorted(n for n in names if n and n.startswith("ProfilerStep#"))
        assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
        assert {"aten::mm", "gloo:all_reduce", "Optimizer.step#AdamW.step"} <= names
    assert first.count("profile: steps 2-3 traced into") == 1  # rank 0 says it


def test_a_memory_snapshot_on_cpu_is_refused_once(observed):
    run_dir, first, second = observed
    for output in (first, second):
        assert output.count("profile.memory_snapshot: memory snapshots need CUDA") == 1
    assert not list((run_dir / "profiles").glob("memory_*"))


def test_tracking_without_wandb_installed_is_one_line(data_root, tmp_path):
    hide = "import sys; sys.modules['wandb'] = None\n"
    result = subprocess.run(
        [sys.executable, "-c", hide + TRAIN, "--config", "tiny"]
        + overrides(data_root, tmp_path, 2, "wandb.mode=online"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config field 'wandb.mode': online needs the wandb package: "
        "pip install 'megatron_transfusion[wandb]'"
    )


def test_a_hang_dumps_every_ranks_stacks_then_the_collective_times_out(data_root, tmp_path):
    """Rank 1 sleeps 20 s inside step 2 while rank 0 waits in that step's first
    collective. After 3 s without a step both ranks dump their stacks: rank 1's shows the
    sleep, rank 0's the all-reduce. After 12 s (distributed.timeout_minutes=0.2, which
    Megatron's data-parallel group got too) rank 0's all-reduce fails."""
    args = overrides(data_root, tmp_path, 4, "checkpoint.interval=100")
    args += [
        "model.fuse_elementwise=false",  # no compiling: step 1 takes well under the timeout
        "distributed.timeout_minutes=0.2",
        "distributed.hang_watchdog_minutes=0.05",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["tests/distributed/hang_worker.py", "--sleep", "20", "--config", "tiny", *args],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "Timed out waiting 12000ms" in output, output[-4000:]
    hangs = tmp_path / "tiny" / "hangs"
    for rank, frame in ((0, "in all_reduce"), (1, "in sleep_in_step")):
        dump = (hangs / f"rank_{rank}.txt").read_text()
        stalled = dump.split(f"hang watchdog: rank {rank} has finished no training step")[-1]
        assert "(the last was step 1); its threads' stacks:" in stalled, dump
        assert frame in stalled, dump
        assert f"hang watchdog: rank {rank} has finished no training step" in result.stderr


def test_the_collective_timeout_reaches_every_process_group():
    """The world's group (the trainer's own collectives, checkpoint barriers) and
    Megatron's; the test above sees one of them time out for real."""
    code = (
        "import torch, torch.distributed as dist\n"
        "from megatron.core import parallel_state as ps\n"
        "from megatron_transfusion import platform\n"
        "from megatron_transfusion.config import ParallelConfig\n"
        "from megatron_transfusion.parallel import init_distributed\n"
        "init_distributed(ParallelConfig(), platform.activate(), timeout_minutes=0.2)\n"
        "groups = [dist.group.WORLD, ps.get_data_parallel_group()]\n"
        "groups += [ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()]\n"
        "for group in groups:\n"
        "    print(group._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["12.0"] * 4
