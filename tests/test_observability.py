"""What a training run tells about itself, over real processes: the W&B run (offline) and
its continuation after a resume, sample grids from its evaluations, mtf-evaluate's W&B
evaluation run, the progress fields, profiler traces per rank, memory snapshots on CPU, and
a hang: every rank's stacks, then the collective timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.test_generation import heldout, run_cli
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
    """2 ranks, 4 steps with everything on, then resumed to step 6: (run dir, outputs).
    Evaluations at steps 3 and 6 draw a grid of two held-out captions' images."""
    root = tmp_path_factory.mktemp("observed")
    watch = ["wandb.mode=offline", "wandb.tags=[smoke]", "profile.memory_snapshot=true"]
    watch += ["eval.interval=3", *heldout(data_root)]
    watch += ["eval.samples=2", "eval.diffusion_steps=2", "eval.batches=1"]
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


class WandbRun(NamedTuple):
    directory: Path  # wandb/offline-run-*/
    run: object  # the RunRecord: id, names, group, job type, tags
    history: dict  # step -> values
    metrics: dict  # define_metric: name or glob -> step metric


def wandb_runs(run_dir: Path) -> list[WandbRun]:
    """Each offline W&B run directory (one per process that opened a run), oldest first."""
    runs = []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        (file,) = directory.glob("run-*.wandb")
        run, history, metrics = None, {}, {}
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                values = history[record.history.step.num] = {}
                for item in record.history.item:  # a logged image is one nested key per field
                    *parents, key = [item.key] if item.key else item.nested_key
                    for parent in parents:
                        values = values.setdefault(parent, {})
                    values[key] = json.loads(item.value_json)
                    values = history[record.history.step.num]
            elif kind == "metric":
                name = record.metric.name or record.metric.glob_name
                metrics[name] = record.metric.step_metric
        runs.append(WandbRun(directory, run, history, metrics))
    return runs


def test_the_wandb_run_holds_the_logged_metrics_and_a_resume_continues_it(observed):
    run_dir, _, _ = observed
    runs = [r for r in wandb_runs(run_dir) if r.run.job_type == "train"]
    assert len(runs) == 2, "one offline run directory per process, both in the run directory"
    first, second = runs
    assert first.run.run_id == second.run.run_id == (run_dir / "logs" / "wandb_run_id").read_text()
    for r in runs:
        assert (r.run.display_name, r.run.run_group, list(r.run.tags)) == (
            "tiny",
            "tiny",
            ["smoke"],
        )
    assert sorted(first.history) == [1, 2, 3, 4] and sorted(second.history) == [5, 6]
    logged = losses(run_dir.parent)
    for step, values in {**first.history, **second.history}.items():
        assert (values["loss"], values["lm_loss"], values["diffusion_loss"]) == logged[step]
        assert {"lr", "grad_norm", "tokens_per_second", "data/text/tokens"} <= set(values)


def same_picture(a: Path, b: Path) -> bool:
    return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_training_evaluations_send_sample_grids_to_every_sink(observed):
    """eval.samples=2: at steps 3 and 6 the two held-out captions' images, one grid in
    eval_samples/ (its captions beside it), tensorboard and the W&B run, with the eval scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = observed
    first, second = [r for r in wandb_runs(run_dir) if r.run.job_type == "train"]
    evaluations = [json.loads(line) for line in (run_dir / "logs" / "eval.jsonl").open()]
    assert [e["step"] for e in evaluations] == [3, 6]
    for tracked, evaluation in ((first, evaluations[0]), (second, evaluations[1])):
        step = evaluation["step"]
        logged = tracked.history[step]
        assert logged["eval/heldout/images/loss"] == evaluation["heldout/images/loss"]
        png = run_dir / "eval_samples" / f"step_{step:08d}.png"
        assert Image.open(png).size == (2 * 32, 32)  # two 32-px images side by side
        image = logged["eval/samples"]
        assert image["_type"] == "image-file" and (image["width"], image["height"]) == (64, 32)
        assert same_picture(tracked.directory / "files" / image["path"], png)
    captions = (run_dir / "eval_samples" / "step_00000003.txt").read_text()
    assert captions == (run_dir / "eval_samples" / "step_00000006.txt").read_text()
    assert len(captions.split("; ")) == 2
    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    board.Reload()
    assert [event.step for event in board.Images("eval/samples")] == [3, 6]


def test_mtf_evaluate_logs_each_checkpoint_to_one_wandb_evaluation_run(observed, monkeypatch):
    """Checkpoints evaluated in any order (step 6, then 4) land in one W&B run of job type
    "eval" in the training run's group, plotted against checkpoint_step, with the grid."""
    run_dir, _, _ = observed
    monkeypatch.setenv("WANDB_MODE", "offline")
    for step in (6, 4):
        result = run_cli(
            "megatron_transfusion.evaluation.cli",
            "main",
            run_dir / "checkpoints" / f"step_{step:08d}",
            "eval.images=2",
            "eval.diffusion_steps=2",
            "eval.batches=1",
        )
        assert result.returncode == 0, result.stderr[-4000:]
    runs = [r for r in wandb_runs(run_dir) if r.run.job_type == "eval"]
    assert len(runs) == 2
    assert (
        runs[0].run.run_id == runs[1].run.run_id != (run_dir / "logs" / "wandb_run_id").read_text()
    )
    for r, step in zip(runs, (6, 4)):
        assert (r.run.display_name, r.run.run_group) == ("tiny-eval", "tiny")
        assert r.metrics["eval/*"] == "checkpoint_step"
        (logged,) = r.history.values()
        result = json.loads((run_dir / "eval" / f"step_{step:08d}.json").read_text())
        saved, skipped = result["metrics"], result["skipped"]
        assert sorted(skipped) == ["clip_score", "fid", "inception_score"]  # no weights given
        assert skipped["fid"] == skipped["inception_score"]
        assert skipped["fid"].startswith("skipped: set eval.inception_weights")
        assert logged["checkpoint_step"] == step
        assert {k: logged[f"eval/{k}"] for k in saved} == saved
        image = logged["eval/samples"]
        assert (image["width"], image["height"]) == (64, 64)  # guided above unconditional
        assert same_picture(
            r.directory / "files" / image["path"], run_dir / "eval" / f"step_{step:08d}.png"
        )


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
