"""Full-shape rehearsal on CPU (issue 13.3): the paper's shapes through the documented path,
as a lab's first run would take it, so that what toy shapes hide shows up here first.

    python -m benchmarks.rehearsal --out runs/rehearsal        # or: make rehearsal

1. inputs as a user brings them: 256×256 PNG + caption pairs in a webdataset tar, and a
   JSONL of long text documents (4,094, 4,095 and 4,096 tokens, the row-length boundary, and
   one of ~11k tokens, from CPython's documentation); a byte-level BPE tokenizer trained on
   that documentation and the captions (the paper's Llama-2 vocabulary cannot be downloaded
   here: 32k asked, ~9k merges found; the model keeps the preset's 32k vocabulary);
2. ``mtf-prepare-data shard`` + ``merge`` with default flags, images through the project's
   VAE (the built-in one, fully convolutional: 256 px -> 32×32×8 latents);
3. ``sbatch launch/pretrain_0.16b.sh`` on the local Slurm (``launch/local_slurm.sh``): the
   transfusion-0.16b preset (seq 4,096, U-Net patch layers at 32×32 latents, 2×2 patches,
   width 768, 12 heads, vocabulary 32,000), except ``LAYERS`` layers instead of 16 and a
   one-row global batch, which time and this machine's memory force (see ``OVERRIDES``);
4. USR1 to the batch shell after step 1 (as ``--signal=B:USR1`` sends it): the trainer
   saves, the job requeues itself and resumes to ``STEPS``;
5. ``mtf-generate`` one 256-px image for a training caption, and one caption for a training
   image, from the resumed run's last checkpoint.

Writes ``<out>/results.json``: the time of every stage, each step's seconds and memory beside
the planner's prediction, the trainer process's peak RSS, and ``mtf-plan``'s line for the
same layout on ``cpu``. Exits non-zero with the failing stage's log tail.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.learning_quality import _run, _tool
from data_prep.images import encode_png
from data_prep.shapes import pair_scenes, render, single_scenes
from megatron_transfusion.config import sources_override

ROOT = Path(__file__).resolve().parents[1]
PRESET = "transfusion-0.16b"
IMAGE_SIZE = 256
IMAGES = 32
# Text tokens per boundary document: laid out as BOS text EOS they take 4,096 positions (one
# full row), 4,097 and 4,098 (a full row and a continuation).
BOUNDARY_TOKENS = (4094, 4095, 4096)
LAYERS = 4
STEPS = 3  # the stop comes after step 1: step 2 is saved, step 3 runs after the resume
DIFFUSION_STEPS = 5  # of the paper's 250: one image is the point here, not its quality
CAPTION_TOKENS = 16
NO_SLURM = 3  # exit code when no local Slurm can run here (as launch/local_slurm.sh's)
# What differs from the preset, and why: all 16 layers would take 213 s a step instead of 140
# and 12.9 GiB instead of 8.5 (mtf-plan on `cpu`), past 10 minutes for three steps and too much
# memory beside the other jobs of a shared 2-core, 23 GiB machine; one row of 4,096 tokens per
# step instead of 512 (the paper's 2M tokens), which would take hours a step.
# run.seed=12 orders the data so that row 1 is the first window of the 4,095-token document
# (BOS + 4,095 tokens) and row 3, after the resume, its last window (its last token and EOS).
OVERRIDES = (
    f"model.num_layers={LAYERS}",
    "data.global_batch_tokens=4096",
    f"run.train_steps={STEPS}",
    "run.log_interval=1",
    "eval.interval=0",
    "run.seed=12",
)


def make_inputs(out: Path, seed: int = 0) -> dict:
    """The tar of images, a training image as a PNG of its own (to caption), the tokenizer
    and the JSONL of documents; returns what the later stages need."""
    from pydoc_data.topics import topics

    from data_prep.builtin import builtin_text_documents
    from data_prep.tokenizer import train_bpe

    rng = random.Random(seed)
    scenes = single_scenes() + pair_scenes()
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions = []
    with tarfile.open(out / "images" / "images-000000.tar", "w") as tar:
        for i in range(IMAGES):
            scene = rng.choice(scenes)
            png = encode_png(render(scene, IMAGE_SIZE, rng))
            captions.append(scene.caption())
            for suffix, data in ((".png", png), (".txt", captions[-1].encode())):
                info = tarfile.TarInfo(f"{i:06d}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if i == 0:
                (out / "caption_me.png").write_bytes(png)

    # Asked for the paper's 32k; these ~390k characters give ~9k merges.
    tokenizer = train_bpe(builtin_text_documents() + captions, 32000, out / "tokenizer.json")
    long_text = topics["specialnames"]
    documents = [_prefix_of_length(long_text, n, tokenizer) for n in BOUNDARY_TOKENS]
    documents.append(topics["compound"])
    (out / "text").mkdir(exist_ok=True)
    with open(out / "text" / "text-000000.jsonl", "w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}) + "\n")
    return {
        "caption": captions[0],
        "document_tokens": [len(tokenizer.encode(d)) for d in documents],
    }


def _prefix_of_length(text: str, tokens: int, tokenizer) -> str:
    """The shortest prefix of ``text`` that encodes to exactly ``tokens`` tokens."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high) // 2
        if len(tokenizer.encode(text[:middle])) < tokens:
            low = middle + 1
        else:
            high = middle
    if len(tokenizer.encode(text[:low])) != tokens:
        raise SystemExit(f"no prefix of the text encodes to exactly {tokens} tokens")
    return text[:low]


# ---------------------------------------------------------------------------------------------
# Slurm


def _slurm(env: dict, *args: str) -> str:
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def start_slurm() -> tuple[dict, bool]:
    """(environment for client commands, whether it was already running)."""
    local = ["bash", str(ROOT / "launch" / "local_slurm.sh")]
    running = subprocess.run([*local, "status"], capture_output=True).returncode == 0
    started = subprocess.run([*local, "start"], capture_output=True, text=True, timeout=900)
    if started.returncode:  # 3: Slurm cannot be installed here (not root, no apt)
        print(f"no local Slurm: {started.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        raise SystemExit(NO_SLURM)
    conf = re.fullmatch(r"export SLURM_CONF=(\S+)", started.stdout.strip()).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=conf, MTF_ENV=str(Path(sys.executable).parents[1]))
    return env, running


def _job(env: dict, job: str) -> dict:
    return dict(re.findall(r"(\w+)=(\S+)", _slurm(env, "scontrol", "show", "job", job)))


def _trainer_peak_rss(run_name: str) -> dict[int, int]:
    """VmHWM (bytes) of each running trainer process of this run, by pid (not torchrun's)."""
    peaks = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if (
                b"megatron_transfusion.train" not in cmdline
                or f"run.name={run_name}".encode() not in cmdline
            ):
                continue
            if b"torch.distributed.run" in cmdline:
                continue
            status = (proc / "status").read_text()
        except (OSError, ValueError):
            continue
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if found:
            peaks[int(proc.name)] = int(found.group(1)) * 1024
    return peaks


MARKERS = {  # job log line -> timeline event
    "step 1 |": "step_1_logged",
    "stop requested: saved step": "stop_saved",
    "requeueing job": "requeued",
    "(restart 1)": "restarted",
    "resumed from": "resumed",
    f"step {STEPS} |": "last_step_logged",
    "training finished": "finished",
}


def train_preempt_resume(env: dict, out: Path, data: dict[str, Path], timeout: float) -> dict:
    """Submit, stop after step 1, follow the requeued job to the end; the timeline in seconds
    from submission, the job's final state and the trainer's peak RSS."""
    log = out / "train.log"
    log.unlink(missing_ok=True)
    overrides = [
        sources_override(data["text"], data["img"]),
        f"run.output_root={out}",
        *OVERRIDES,
    ]
    # The script's allocation is 4 nodes × 8 GPUs: one CPU node here, one trainer process.
    submitted = time.perf_counter()
    job = _slurm(
        env,
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--gpus-per-node=0",
        f"--output={log}",
        "launch/pretrain_0.16b.sh",
        *overrides,
    )
    run_name = f"transfusion-0.16B-{job}"
    events: dict[str, float] = {}
    peaks: dict[int, int] = {}
    signalled = False
    while subprocess.run(
        ["squeue", "-h", "-j", job], env=env, capture_output=True, text=True
    ).stdout.strip():
        elapsed = time.perf_counter() - submitted
        if elapsed > timeout:
            subprocess.run(["scancel", job], env=env)
            raise SystemExit(f"job {job} still running after {timeout:.0f} s; see {log}")
        text = log.read_text() if log.exists() else ""
        for marker, event in MARKERS.items():
            if marker in text and event not in events:
                events[event] = elapsed
        if "step_1_logged" in events and not signalled:
            _slurm(env, "scancel", "--signal=USR1", "--batch", job)
            events["stop_signal_sent"], signalled = elapsed, True
        peaks.update(
            {pid: max(rss, peaks.get(pid, 0)) for pid, rss in _trainer_peak_rss(run_name).items()}
        )
        time.sleep(0.2)
    events["job_done"] = time.perf_counter() - submitted
    info = _job(env, job)
    text = log.read_text()
    if (info["JobState"], info["ExitCode"], info["Restarts"]) != ("COMPLETED", "0:0", "1"):
        raise SystemExit(
            f"job {job}: {info['JobState']} exit {info['ExitCode']} after {info['Restarts']} "
            f"restarts, expected COMPLETED 0:0 after 1; see {log}:\n{text[-3000:]}"
        )
    saved = re.search(r"stop requested: saved step (\d+)", text)
    return {
        "job": job,
        "run_dir": str(out / run_name),
        "events_seconds": events,
        "stop_saved_step": int(saved.group(1)) if saved else None,
        "trainer_peak_rss_gib": [rss / 2**30 for rss in peaks.values()],
    }


# ---------------------------------------------------------------------------------------------


def plan_line() -> dict:
    """``mtf-plan``'s prediction for the same config and layout on ``cpu``, one process."""
    command = [
        _tool("mtf-plan"),
        "--check",
        "--cluster",
        "cpu",
        "--gpus",
        "1",
        "--config",
        PRESET,
        *OVERRIDES,
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = result.stdout.splitlines()
    if len(lines) < 3:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.strip()}")
    memory, step = lines[1], lines[2]  # plan:, memory/GPU:, step:, ok: or error:
    return {
        "command": " ".join(["mtf-plan", *command[1:]]),
        "memory": memory,
        "step": step,
        "memory_gib": float(re.match(r"memory/GPU: ([\d.]+)", memory).group(1)),
        "step_seconds": float(re.match(r"step: ([\d.]+) s", step).group(1)),
    }


def planned_rows(data: dict[str, Path]) -> list[list[dict]]:
    """What each step's row held, from the loader's own plan: examples as stream, sample,
    start and length in positions (the padding is what is left of 4,096)."""
    from megatron_transfusion.config import load_config
    from megatron_transfusion.data import MixedModalityLoader

    cfg = load_config(
        PRESET,
        [*OVERRIDES, sources_override(data["text"], data["img"])],
    )
    sampler = MixedModalityLoader(cfg).sampler
    return [
        [
            {"stream": e.stream, "index": e.index, "start": e.start, "length": e.length}
            for e in sampler.next_row()
        ]
        for _ in range(STEPS)
    ]


def steps(run_dir: Path) -> list[dict]:
    records = [
        json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    keys = (
        "step",
        "loss",
        "lm_loss",
        "diffusion_loss",
        "mfu",
        "memory_gib",
        "predicted_memory_gib",
    )
    return [{"seconds": 4096 / r["tokens_per_second"], **{k: r[k] for k in keys}} for r in records]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/rehearsal")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="OMP_NUM_THREADS of the trainer and generation (default: every core)",
    )
    parser.add_argument(
        "--job-timeout", type=float, default=900, help="seconds before the job is cancelled"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    t = time.perf_counter()
    inputs = make_inputs(out / "inputs")
    timings["inputs_and_tokenizer"] = time.perf_counter() - t
    # A re-run shards (and times it) again; an earlier run's checkpoints take 10 GB.
    for old in [out / "shards", *out.glob("transfusion-0.16B-*")]:
        shutil.rmtree(old, ignore_errors=True)
    data = {"text": out / "shards" / "text", "img": out / "shards" / "img"}
    tokenizer = str(out / "inputs" / "tokenizer.json")
    vae = str(ROOT / "data_prep" / "builtin" / "vae")
    for name, kind, extra in (("text", "text", []), ("img", "image_caption", ["--vae", vae])):
        t = time.perf_counter()
        source = out / "inputs" / ("text" if kind == "text" else "images")
        _run(
            [
                _tool("mtf-prepare-data"),
                "shard",
                "--kind",
                kind,
                "--inputs",
                str(source),
                "--out",
                str(data[name]),
                "--tokenizer",
                tokenizer,
                *extra,
            ],
            out / f"shard_{name}.log",
        )
        _run(
            [_tool("mtf-prepare-data"), "merge", "--out", str(data[name])],
            out / f"merge_{name}.log",
        )
        timings[f"shard_{name}"] = time.perf_counter() - t

    t = time.perf_counter()
    env, was_running = start_slurm()
    timings["slurm_start"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        job = train_preempt_resume(env, out, data, args.job_timeout)
        timings["train_preempt_resume"] = time.perf_counter() - t
    finally:
        if not was_running:
            subprocess.run(
                ["bash", str(ROOT / "launch" / "local_slurm.sh"), "stop"],
                capture_output=True,
                timeout=120,
            )
    run_dir = Path(job["run_dir"])

    generated = out / "generated"
    t = time.perf_counter()
    _run(
        [
            _tool("mtf-generate"),
            str(run_dir),
            "--prompt",
            inputs["caption"],
            "--steps",
            str(DIFFUSION_STEPS),
            "--out",
            str(generated / "image"),
        ],
        out / "generate_image.log",
    )
    timings["generate_image"] = time.perf_counter() - t
    t = time.perf_counter()
    _run(
        [
            _tool("mtf-generate"),
            str(run_dir),
            "--mode",
            "text",
            "--prompt",
            f"<image:{out / 'inputs' / 'caption_me.png'}>",
            "--max-new-tokens",
            str(CAPTION_TOKENS),
            "--out",
            str(generated / "caption"),
        ],
        out / "generate_caption.log",
    )
    timings["generate_caption"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    results = {
        "threads": args.threads,
        "overrides": list(OVERRIDES),
        "inputs": inputs,
        "timings_seconds": timings,
        "job": job,
        "steps": steps(run_dir),
        "rows": planned_rows(data),
        "plan": plan_line(),
        "image": [str(p) for p in sorted((generated / "image").glob("sample_*.png"))],
        "caption": json.loads(
            (generated / "caption" / "samples.jsonl").read_text().splitlines()[0]
        )["output"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("timings_seconds", "steps", "plan")}, indent=2))
    print(f"trainer peak RSS (GiB): {job['trainer_peak_rss_gib']}; caption: {results['caption']!r}")


if __name__ == "__main__":
    main()
