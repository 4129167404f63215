"""The training loop over real processes: learning, exact resume after kill -9, preemption,
atomic checkpoints, non-finite steps."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_transfusion.config import sources_override
from tests.conftest import ROOT
from tests.test_loader import prepare

TRAIN = "from megatron_transfusion.cli import train_main; train_main()"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer-data")
    prepare(root)
    return root


def overrides(data_root, run_root, steps, *extra):
    return [
        sources_override(data_root / "text", data_root / "img"),
        "data.seq_length=128",
        "data.micro_batch_size=2",
        "data.global_batch_tokens=512",
        "model.vocab_size=512",
        "model.max_sequence_length=128",
        f"run.output_root={run_root}",
        f"run.train_steps={steps}",
        "run.log_interval=1",
        "checkpoint.interval=2",
        "optimizer.warmup_steps=2",
        "eval.interval=0",
        *extra,
    ]


def launch(nproc, args, env=None, **kwargs):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "megatron_transfusion.train",
        "--config",
        "tiny",
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def run(nproc, args, expect=0, env=None):
    process = launch(nproc, args, env)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == expect, output[-6000:]
    return output


def losses(run_root):
    """step -> losses, the last record per step (a resumed run re-logs the steps it redoes)."""
    records = {}
    for line in (run_root / "tiny" / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = (record["loss"], record["lm_loss"], record["diffusion_loss"])
    return records


@pytest.fixture(scope="module")
def uninterrupted_run(data_root, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("uninterrupted")
    run(2, overrides(data_root, run_root, 8))
    return run_root


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return losses(uninterrupted_run)


def test_loss_falls_and_checkpoints_are_kept(uninterrupted, uninterrupted_run):
    assert len(uninterrupted) == 8
    assert uninterrupted[8][1] < uninterrupted[1][1]  # LM loss; the DDPM loss is noisier
    kept = sorted(p.name for p in (uninterrupted_run / "tiny" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006", "step_00000008"]  # keep_last=3
    assert (uninterrupted_run / "tiny" / "checkpoints" / "latest").read_text() == "step_00000008"


def test_metrics_carry_mfu_and_memory_beside_the_plan(data_root, uninterrupted_run):
    """On CPU: MFU against the measured GEMM peak, memory as the growth of the resident peak
    over the run, and the layout planner's prediction for this layout (2 ranks) beside it."""
    from megatron_transfusion import platform
    from megatron_transfusion.config import load_config
    from megatron_transfusion.planning.ranking import predicted_memory

    metrics = uninterrupted_run / "tiny" / "logs" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    cfg = load_config("tiny", overrides(data_root, uninterrupted_run, 8))
    planned = predicted_memory(cfg, platform.current(), 2) / 2**30
    assert len(records) == 8
    for record in records:
        assert 0 < record["mfu"] < 1
        assert record["predicted_memory_gib"] == pytest.approx(planned)
        assert 0 < record["memory_gib"] < 2
    assert records[-1]["memory_gib"] >= records[0]["memory_gib"]  # a peak only grows
    # Every source's tokens (laid out in the rows so far: at most the rows' positions, about
    # half each at equal weights) and epochs.
    for step, record in enumerate(records, start=1):
        drawn = [record[f"data/{name}/tokens"] for name in ("text", "image_caption")]
        assert sum(drawn) <= step * cfg.data.global_batch_tokens
        assert min(drawn) / max(drawn) > 0.5
        assert record["data/text/epochs"] >= 0 and record["data/image_caption/epochs"] >= 0


def test_checkpoint_tools_inspect_and_export(uninterrupted_run, tmp_path):
    from safetensors import safe_open

    step8 = uninterrupted_run / "tiny" / "checkpoints" / "step_00000008"
    result = subprocess.run(
        [sys.executable, "-m", "checkpoints.cli", "inspect", str(step8)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert '"step": 8' in result.stdout and '"ranks": 2' in result.stdout
    assert "decoder.layers.mlp.linear_fc1.weight" in result.stdout  # layers stacked on a layer axis
    out = tmp_path / "model.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "checkpoints.cli", "export", str(step8), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(out, "pt") as f:
        assert f.metadata()["step"] == "8"
        fc1 = f.get_tensor("decoder.layers.0.mlp.linear_fc1.weight")
    # The exported (TP=1) SwiGLU weight holds both halves: [2·ffn, hidden].
    assert fc1.shape == (2 * 512, 128)


def test_kill_9_then_resume_continues_bitwise(data_root, uninterrupted, tmp_path):
    process = launch(2, overrides(data_root, tmp_path, 8))
    metrics = tmp_path / "tiny" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until step 5 is logged (a checkpoint at step 4 exists)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    latest = (tmp_path / "tiny" / "checkpoints" / "latest").read_text()
    assert latest in ("step_00000004", "step_00000006")
    output = run(2, overrides(data_root, tmp_path, 8) + ["--resume", "auto"])
    assert "resumed from" in output
    resumed = losses(tmp_path)
    for step in range(int(latest[-2:]) + 1, 9):
        assert resumed[step] == uninterrupted[step], step


def test_preemption_signal_saves_and_exits_for_requeue(data_root, uninterrupted, tmp_path):
    process = launch(2, overrides(data_root, tmp_path, 8, "checkpoint.interval=100"))
    metrics = tmp_path / "tiny" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while (
        not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
        and time.time() < deadline
    ):
        time.sleep(0.2)
    workers = subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2
    for pid in workers:  # what srun --signal / a forwarding batch script delivers to each task
        os.kill(int(pid), signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and "stop requested: saved step" in output, output[-4000:]
    assert "exitcode  : 3" in output
    saved = int((tmp_path / "tiny" / "checkpoints" / "latest").read_text()[-8:])
    assert 3 <= saved < 8
    run(2, overrides(data_root, tmp_path, 8, "checkpoint.interval=100") + ["--resume", "auto"])
    resumed = losses(tmp_path)
    assert all(resumed[s] == uninterrupted[s] for s in range(saved + 1, 9))


def test_async_checkpoints_leave_training_alone_and_resume_bitwise(
    data_root, uninterrupted, tmp_path
):
    """Saves written by a background thread: the loss trace is the synchronous run's, the
    same checkpoints are kept, and resuming from one continues bitwise."""
    run(2, overrides(data_root, tmp_path, 8, "checkpoint.async_save=true"))
    assert losses(tmp_path) == uninterrupted
    checkpoints = tmp_path / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [
        "step_00000004",
        "step_00000006",
        "step_00000008",
    ]
    assert not list(checkpoints.glob(".tmp-*"))
    resumed_root = tmp_path / "resumed"
    run(2, overrides(data_root, resumed_root, 8) + ["--resume", str(checkpoints / "step_00000006")])
    resumed = losses(resumed_root)
    assert sorted(resumed) == [7, 8] and all(resumed[s] == uninterrupted[s] for s in (7, 8))


@pytest.mark.parametrize(
    "layout",
    [
        "parallel.tensor_parallel=2",
        "parallel.pipeline_parallel=2",
        "parallel.engine=deepspeed parallel.zero_stage=3",
    ],
)
def test_resume_on_another_layout_continues(
    data_root, uninterrupted, uninterrupted_run, tmp_path, layout
):
    """Saved at DP=2 (distributed optimizer), resumed at TP=2 or PP=2 (plain optimizer) or
    by DeepSpeed ZeRO-3: weights and optimizer state reshard. The data rows are the same;
    only the diffusion noise stream (per DP rank) differs, so the LM loss continues within
    a tight tolerance."""
    step6 = uninterrupted_run / "tiny" / "checkpoints" / "step_00000006"
    run(2, overrides(data_root, tmp_path, 8, *layout.split()) + ["--resume", str(step6)])
    resumed = losses(tmp_path)
    for step in (7, 8):
        assert resumed[step][1] == pytest.approx(uninterrupted[step][1], rel=0.02), step


def test_non_finite_steps_are_skipped_then_stop_the_run(data_root, tmp_path):
    poison = (
        "import math, megatron_transfusion.training.step as t; original = t.noise_images\n"
        "def poisoned(batch, *a):\n"
        "    noised, noise = original(batch, *a)\n"
        "    return noised.replace(latents=noised.latents * math.nan), noise\n"
        "t.noise_images = poisoned\n"
    )
    args = overrides(data_root, tmp_path, 8, "run.max_consecutive_skips=3")
    result = subprocess.run(
        [sys.executable, "-c", poison + TRAIN, "--config", "tiny", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 consecutive steps had a non-finite loss" in result.stderr.splitlines()[-1]
    records = [
        json.loads(x)
        for x in (tmp_path / "tiny" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["skipped_steps"] for r in records] == [1, 2, 3]


def test_trainer_with_deepspeed_zero2_trains_and_resumes(data_root, tmp_path):
    args = overrides(data_root, tmp_path, 4, "parallel.engine=deepspeed", "parallel.zero_stage=2")
    run(2, args)
    first = losses(tmp_path)
    assert sorted(first) == [1, 2, 3, 4] and first[4][1] < first[1][1]
    output = run(
        2,
        overrides(data_root, tmp_path, 6, "parallel.engine=deepspeed", "parallel.zero_stage=2")
        + ["--resume", "auto"],
    )
    assert "resumed from" in output and "at step 4" in output
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    # Its checkpoints are the project's layout: the model exports and loads for generation
    # like any other run's.
    step6, out = tmp_path / "tiny" / "checkpoints" / "step_00000006", tmp_path / "model.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "checkpoints.cli", "export", str(step6), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and out.exists(), result.stderr[-3000:]
    load = (
        "from megatron_transfusion.inference.load import load_for_inference; "
        f"print(load_for_inference('{step6}').step)"
    )
    result = subprocess.run([sys.executable, "-c", load], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split()[-1] == "6", result.stderr[-3000:]
