"""Peak memory of real training steps on this CPU against the layout planner's prediction.

    python -m benchmarks.peak_memory            # the cases below: measured vs predicted

Each case is a list of config overrides (of the defaults, ``load_config(None, ...)``); one
torchrun of two processes over gloo runs them all (DP=2 where a case sets no TP/PP), one
after another, each with a fresh model and engine, built and stepped exactly as the trainer
does (``trainer.build_engine``, ``Engine.train_step`` on noised synthetic micro-batches),
fp32 as on every CPU run. tests/test_plan.py runs the same cases.

What is measured, per process and case: the growth of the resident set (Linux
``VmRSS``/``VmHWM``) over a baseline taken once the process groups and the case's
synthetic batches exist, i.e. what building the model and engine and training add:

- ``state``: resident growth after a full step (parameters, gradient buffers, optimizer
  state: what stays between steps);
- ``peak``: the high-water mark during the second step (the peak counter is reset just
  before it): the number to compare with a device's memory.

glibc's malloc is told to map every allocation of 64 KiB or more separately
(``M_MMAP_THRESHOLD``, before any tensor exists), so a freed tensor leaves the resident set
at once and the numbers follow live tensor memory rather than the allocator's caching. A
small warm-up case runs first, unmeasured (``WARM_UP``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_transfusion import platform
from megatron_transfusion.config import load_config
from megatron_transfusion.diffusion import CosineSchedule, noise_images
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything
from megatron_transfusion.synthetic import random_batch
from megatron_transfusion.training.step import MicroBatch
from megatron_transfusion.training.trainer import build_engine

ROOT = Path(__file__).resolve().parents[1]
NPROC = 2  # one run of two processes (torchrun over gloo) measures every case
# A small model with every part of the real one: 4 layers of width 256 (SwiGLU 768), an
# 8k vocabulary, rows of 256 tokens holding text and 16-patch images; one micro-batch of
# 2 rows per step and rank (4 micro-batches for the pipeline).
BASE = [
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.num_attention_heads=4",
    "model.vocab_size=8192",
    "model.max_sequence_length=1024",
    "model.latent_size=4",
    "model.patch_size=1",
    "model.patch_layer=linear",
    "model.timestep_frequency_dim=64",
    "data.seq_length=256",
    "data.micro_batch_size=2",
    "data.global_batch_tokens=1024",
]
CASES = {
    "DP=2 ZeRO-0": ["parallel.zero_stage=0"],
    "DP=2 ZeRO-1": [],
    "full recompute, 1024 tokens": [
        "data.seq_length=1024",
        "data.micro_batch_size=1",
        "data.global_batch_tokens=2048",
        "parallel.recompute=full",
    ],
    "width 384, GQA, selective": [
        "model.hidden_size=384",
        "model.num_attention_heads=6",
        "model.num_query_groups=2",
        "parallel.recompute=selective",
    ],
    "U-Net patch layers": [
        "model.latent_size=8",
        "model.patch_size=2",
        "model.patch_layer=unet",
        "model.unet_channels=[32, 64]",
    ],
    "TP=2": ["parallel.tensor_parallel=2", "data.global_batch_tokens=512"],
    "TP=2 + SP": [
        "parallel.tensor_parallel=2",
        "parallel.sequence_parallel=true",
        "data.global_batch_tokens=512",
    ],
    "PP=2, 4 micro-batches": ["parallel.pipeline_parallel=2", "data.global_batch_tokens=2048"],
}
# Run first, unmeasured: one-time costs (modules imported while building an engine, thread
# pools, ~15 MiB set up by the first convolutions, ~5-12 MiB of scratch kept after the first
# 1024-token rows) then fall before every case's baseline.
WARM_UP = (
    BASE
    + CASES["U-Net patch layers"]
    + CASES["full recompute, 1024 tokens"]
    + ["model.num_layers=1"]
)


def resident_bytes() -> dict[str, int]:
    """Current and peak resident set size of this process, in bytes."""
    status = Path("/proc/self/status").read_text()
    return {
        key: 1024 * int(re.search(rf"{key}:\s+(\d+) kB", status).group(1))
        for key in ("VmRSS", "VmHWM")
    }


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current VmRSS."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(overrides: list[str], plat) -> dict:
    """Build, step once, then measure a second step (see the module docstring)."""
    cfg = load_config(None, overrides)
    init_distributed(cfg.parallel, plat)
    seed_everything(cfg.run.seed)
    dp = parallel_state.get_data_parallel_world_size()
    d = cfg.data
    count = d.global_batch_tokens // (d.seq_length * d.micro_batch_size * dp)
    generator = torch.Generator().manual_seed(
        cfg.run.seed + parallel_state.get_data_parallel_rank()
    )
    schedule = CosineSchedule.from_config(cfg.diffusion)
    micro = [
        MicroBatch(
            *noise_images(
                random_batch(generator, cfg.model, d.micro_batch_size, d.seq_length),
                schedule,
                cfg.diffusion,
                generator,
            )
        )
        for _ in range(count)
    ]
    image_tokens = sum(int((m.batch.image_ids >= 0).sum()) for m in micro)
    gc.collect()
    baseline = resident_bytes()["VmRSS"]
    engine = build_engine(cfg, plat, build_model(cfg, plat))
    assert not engine.train_step(micro, 1e-4).skipped  # creates the optimizer state
    gc.collect()
    state = resident_bytes()["VmRSS"] - baseline
    reset_peak()
    engine.train_step(micro, 1e-4)
    peak = resident_bytes()["VmHWM"] - baseline
    del engine, micro
    gc.collect()
    parallel_state.destroy_model_parallel()
    results = [None] * dist.get_world_size()
    dist.all_gather_object(
        results,
        {
            "state": state,
            "peak": peak,
            "image_tokens": image_tokens,
            "tokens": count * d.micro_batch_size * d.seq_length,
        },
    )
    tokens = sum(r["tokens"] for r in results)
    return {
        "overrides": overrides,
        "image_token_fraction": sum(r["image_tokens"] for r in results) / tokens,
        "state": [r["state"] for r in results],
        "peak": [r["peak"] for r in results],
    }


def worker(argv: list[str]) -> None:
    """One process of a run (under torchrun): measure every case, rank 0 writes the JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--cases", type=json.loads, required=True, help="JSON list of override lists"
    )
    parser.add_argument("--warm-up", type=json.loads, required=True, help="JSON override list")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plat = platform.activate()
    measure(args.warm_up, plat)  # not recorded
    results = [measure(case, plat) for case in args.cases]
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(results, indent=1))
    destroy_distributed()


def run(cases: dict[str, list[str]], timeout: int = 600) -> dict[str, dict]:
    """Measure ``cases`` (name -> overrides of BASE) in one torchrun of NPROC processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={NPROC}",
            "--standalone",
            str(Path(__file__).resolve()),
            "--worker",
            "--out",
            str(out),
            "--warm-up",
            json.dumps(WARM_UP),
            "--cases",
            json.dumps([BASE + overrides for overrides in cases.values()]),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            )
        return dict(zip(cases, json.loads(out.read_text())))


def predicted(result: dict) -> list:
    """The planner's Memory for each rank of a measured case (ranks 0/1 = first/last stage)."""
    from megatron_transfusion.planning.cluster import CLUSTERS
    from megatron_transfusion.planning.layouts import Layout
    from megatron_transfusion.planning.memory import stage_memory

    cfg = load_config(None, result["overrides"])
    ranks = len(result["peak"])
    layout = Layout.of_config(cfg, ranks)
    stages = (
        [(True, True)] * ranks
        if layout.pp == 1
        else [(r == 0, r == ranks - 1) for r in range(ranks)]
    )
    return [
        stage_memory(cfg, CLUSTERS["cpu"], layout, result["image_token_fraction"], first, last)
        for first, last in stages
    ]


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD = 64 KiB, fixed
        return worker(sys.argv[2:])
    mib = 2**20
    print(
        f"{'case':30s} {'rank':>4} | {'state MiB':>9} {'predicted':>9} {'error':>7} | "
        f"{'peak MiB':>9} {'predicted':>9} {'error':>7}"
    )
    for name, result in run(CASES).items():
        for rank, memory in enumerate(predicted(result)):
            state, peak = result["state"][rank], result["peak"][rank]
            print(
                f"{name:30s} {rank:>4} | {state / mib:9.1f} {memory.state / mib:9.1f} "
                f"{memory.state / state - 1:+7.1%} | {peak / mib:9.1f} {memory.total / mib:9.1f} "
                f"{memory.total / peak - 1:+7.1%}"
            )


if __name__ == "__main__":
    main()
