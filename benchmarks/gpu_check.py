"""The GPU check (issue 13.4): what only a GPU can show, in one run, into one JSON.

    bash benchmarks/gpu_check.sh --out gpu_check.json          # one GPU, ~4-8 minutes
    bash benchmarks/gpu_check.sh --dry-run --out dry.json      # the same parts on CPU, tiny shapes

Parts, each in its own process with its own time limit (a crash, a hang or a missing
package is recorded as that part's ``error`` and the next part runs; the JSON is rewritten
after every part, so a run killed from outside still leaves what was done):

- ``gpu_tests``: the test suite's GPU-only tests (compiled FlexAttention forward and
  backward in bf16 against the fp32 dense reference on a packed mask, and the ``flash``
  run split); the dry run runs their CPU counterparts.
- ``attention``: the same comparison at the transfusion-0.16b preset's shapes (4,096-token
  rows packed with text and 256-patch images), with each backend's forward+backward time.
- ``training``: bf16 training steps of transfusion-0.16b at seq 4,096 through the Megatron
  engine on synthetic packed batches: tokens/s, MFU against the datasheet peak
  (``Platform.peak_flops``), peak memory against the layout planner's prediction.
- ``sampling``: text -> image with the KV cache and classifier-free guidance (random
  weights: speed does not depend on them): seconds per image and per diffusion step.

The dry run uses the tiny preset and a few steps on the CPU (seconds; CI runs it): the
same code and the same JSON keys, so a mistake in this script shows up before a GPU is lent.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform as host
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

# Seconds each part may take on one H100 (compiling included); their sum stays under the
# 8 minutes the whole check may take, with a margin for the setup.
LIMITS = {"gpu_tests": 100, "attention": 60, "training": 170, "sampling": 110}
# Every backend against the fp32 dense reference, as tests/test_mask.py checks them.
TOLERANCE = {"torch.bfloat16": 2e-2, "torch.float32": 1e-4}
GPU_TESTS = ["tests/test_mask.py::test_gpu_backends_equal_dense_forward_and_backward"]
CPU_TESTS = [
    "tests/test_mask.py::test_split_runs_equal_dense_sdpa_forward_and_backward",
    "tests/test_mask.py::test_flex_backward_on_cpu_equals_dense_or_is_unsupported",
]


class CheckFailed(RuntimeError):
    """A part ran but its figures are wrong; its results are kept beside the error."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


def shapes(dry_run: bool) -> tuple[str, list[str]]:
    """The preset and overrides a part runs: the paper's 0.16B at seq 4,096, or tiny (CPU)."""
    common = ["data.sources=[]", "eval.interval=0"]
    if dry_run:
        return "tiny", common + [
            "data.seq_length=256",
            "data.micro_batch_size=2",
            "data.global_batch_tokens=1024",
        ]
    # 8 rows of 4,096 tokens per step in micro-batches of 2: ~0.3 s of work at 30% MFU.
    return "transfusion-0.16b", common + [
        "data.micro_batch_size=2",
        "data.global_batch_tokens=32768",
    ]


def _world(cfg):
    from megatron_transfusion import platform
    from megatron_transfusion.parallel import init_distributed, seed_everything

    plat = platform.activate()
    init_distributed(cfg.parallel, plat)
    seed_everything(0)
    return plat


def _median_seconds(fn, repeats: int) -> float:
    """``fn`` returns a tensor; reading a value of it waits for the GPU's queued work."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        float(fn().float().sum())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# Parts: each returns its results (JSON-able) or raises; run by ``--run-part NAME``.
# --------------------------------------------------------------------------------------


def gpu_tests(dry_run: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        tests = CPU_TESTS if dry_run else GPU_TESTS
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
        ]
        result = subprocess.run(cmd + tests, cwd=ROOT, capture_output=True, text=True, check=False)
        if not report.exists():
            ending = result.stdout[-1500:]
            raise RuntimeError(f"pytest wrote no report (exit {result.returncode}): {ending}")
        outcomes = {}
        for case in ElementTree.parse(report).iter("testcase"):
            status, message = "passed", None
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    status, message = child.tag, (child.get("message") or "")[:500]
            outcomes[case.get("name")] = {"outcome": status, "message": message}
    if not outcomes or result.returncode not in (0, 5):
        raise RuntimeError(f"pytest exit {result.returncode}: {json.dumps(outcomes)[:1500]}")
    return {"tests": outcomes}


def attention(dry_run: bool) -> dict:
    import torch

    from kernels.attention import attend, build_attention_mask
    from megatron_transfusion import platform
    from megatron_transfusion.config import load_config
    from megatron_transfusion.synthetic import random_batch

    cfg = load_config(*shapes(dry_run))
    m, seq = cfg.model, cfg.data.seq_length
    plat = platform.current()
    device = plat.device()
    generator = torch.Generator().manual_seed(0)
    batch = random_batch(generator, m, cfg.data.micro_batch_size, seq).to(device)

    def draw(heads):
        t = torch.randn(batch.tokens.shape[0], heads, seq, m.head_dim, generator=generator)
        return t.to(device=device, dtype=plat.dtype).requires_grad_()

    q, k, v = draw(m.num_attention_heads), draw(m.query_groups), draw(m.query_groups)
    grad = torch.randn(q.shape, generator=generator).to(device=device, dtype=plat.dtype)
    scale = m.head_dim**-0.5

    def run(backend, inputs, backward=True) -> list:
        """[out] or [out, dq, dk, dv] of ``backend``, the mask built as a training step does."""
        mask = build_attention_mask(batch, backend, m.flex_block_size)
        if not backward:
            return [attend(*(t.detach() for t in inputs), mask, scale=scale)]
        out = attend(*inputs, mask, scale=scale)
        return [out, *torch.autograd.grad(out, inputs, grad.to(out.dtype))]

    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = [t.detach() for t in run("sdpa", fp32)]
    tolerance = TOLERANCE[str(plat.dtype)]
    results = {
        "seq_length": seq,
        "rows": batch.tokens.shape[0],
        "images": batch.num_images,
        "dtype": str(plat.dtype),
        "reference": "dense SDPA in fp32",
        "tolerance": {"atol": tolerance, "rtol": tolerance},
    }
    wrong = []
    for backend in ("sdpa", "flex", "flash"):
        # torch has no FlexAttention backward on CPU: the dry run checks its forward only.
        backward = plat.is_gpu or backend != "flex"
        outputs = [t.detach().float() for t in run(backend, [q, k, v], backward)]  # compiles once
        names = ["out", "dq", "dk", "dv"][: len(outputs)]
        pairs = list(zip(names, outputs, reference))
        outside = {
            n: float((~torch.isclose(a, e, atol=tolerance, rtol=tolerance)).float().mean())
            for n, a, e in pairs
        }
        timed = functools.partial(lambda *a: run(*a)[-1], backend, [q, k, v], backward)
        results[backend] = {
            "max_abs_error": {n: float((a - e).abs().max()) for n, a, e in pairs},
            "fraction_outside_tolerance": outside,
            "backward": backward,
            "ms": 1e3 * _median_seconds(timed, 3 if dry_run else 10),
        }
        wrong += [f"{backend} {n}" for n, fraction in outside.items() if fraction > 0]
    if not plat.is_gpu:
        results["flex"]["note"] = "forward only: torch has no FlexAttention backward on CPU"
    if wrong:
        raise CheckFailed(f"outside the tolerance: {', '.join(wrong)}", results)
    return results


def training(dry_run: bool) -> dict:
    import torch

    from megatron_transfusion.config import load_config
    from megatron_transfusion.diffusion import CosineSchedule
    from megatron_transfusion.model import build_model
    from megatron_transfusion.planning.ranking import predicted_memory
    from megatron_transfusion.synthetic import random_batch
    from megatron_transfusion.training.metrics import mfu, model_flops_per_token
    from megatron_transfusion.training.step import MicroBatch
    from megatron_transfusion.training.trainer import build_engine

    preset, overrides = shapes(dry_run)
    cfg = load_config(preset, overrides)
    plat = _world(cfg)
    d = cfg.data
    memory_start = plat.peak_memory()
    engine = build_engine(cfg, plat, build_model(cfg, plat))
    generator = torch.Generator().manual_seed(0)
    schedule = CosineSchedule.from_config(cfg.diffusion)
    rows = d.global_batch_tokens // d.seq_length
    batches = [
        random_batch(generator, cfg.model, d.micro_batch_size, d.seq_length)
        for _ in range(rows // d.micro_batch_size)
    ]
    micro = [MicroBatch.draw(b, schedule, cfg.diffusion, generator, plat.device()) for b in batches]
    image_fraction = sum(int((b.image_ids >= 0).sum()) for b in batches) / (rows * d.seq_length)
    parameter = next(engine.model_chunks[0].parameters())

    def steps(n: int) -> tuple[list, float]:
        """n optimizer steps and their seconds, the GPU's queue drained at the end."""
        start = time.perf_counter()
        done = [engine.train_step(micro, 1e-4) for _ in range(n)]
        float(parameter.float().sum())
        return done, time.perf_counter() - start

    warm_up, warm_up_seconds = steps(2)  # compiles (FlexAttention, the elementwise kernels)
    timed, seconds = steps(2 if dry_run else 8)
    rate = len(timed) * d.global_batch_tokens / seconds
    peak = plat.peak_flops()
    losses = [r.losses.total for r in warm_up + timed]
    flops = model_flops_per_token(cfg.model, d.seq_length, image_fraction)
    results = {
        "config": preset,
        "seq_length": d.seq_length,
        "micro_batch_size": d.micro_batch_size,
        "tokens_per_step": d.global_batch_tokens,
        "image_token_fraction": image_fraction,
        "dtype": str(plat.dtype),
        "warm_up_seconds": warm_up_seconds,
        "steps_timed": len(timed),
        "seconds_per_step": seconds / len(timed),
        "tokens_per_second": rate,
        "peak_flops": peak,
        "mfu": mfu(rate, flops, peak),
        "peak_memory_gib": (plat.peak_memory() - memory_start) / GiB,
        "predicted_memory_gib": predicted_memory(cfg, plat, 1) / GiB,
        "losses": losses,
    }
    if not all(math.isfinite(x) for x in losses):
        raise CheckFailed("a non-finite loss", results)
    return results


def sampling(dry_run: bool) -> dict:
    from megatron_transfusion.batch import ImageSegment, SpecialTokens, TextSegment
    from megatron_transfusion.config import load_config
    from megatron_transfusion.inference.generate import Generator, SamplingConfig
    from megatron_transfusion.model import build_model

    preset, overrides = shapes(dry_run)
    cfg = load_config(preset, overrides)
    plat = _world(cfg)
    (model,) = build_model(cfg, plat)
    special = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4)
    steps = 2 if dry_run else 100

    def generate(batch_size: int, diffusion_steps: int) -> float:
        """Seconds to draw one image for each of ``batch_size`` 16-token captions."""
        prompts = [[TextSegment([1, *range(10 + i, 26 + i)])] for i in range(batch_size)]
        sampling = SamplingConfig(max_new_tokens=0, diffusion_steps=diffusion_steps)
        start = time.perf_counter()
        drawn = Generator(model, cfg, special, sampling).generate(prompts, force_image=True)
        images = [s.latent for row in drawn for s in row if isinstance(s, ImageSegment)]
        float(sum(latent.float().sum() for latent in images))  # the GPU's queue drained
        return time.perf_counter() - start

    generate(1, 2)  # warm-up
    results = {
        "config": preset,
        "patches_per_image": cfg.model.patches_per_image,
        "diffusion_steps": steps,
        "guidance_scale": SamplingConfig().guidance_scale,
        "kv_cache": SamplingConfig().use_cache,
        "batches": {},
    }
    for batch_size in (1, 2) if dry_run else (1, 8):
        seconds = generate(batch_size, steps)
        results["batches"][str(batch_size)] = {
            "seconds": seconds,
            "images_per_second": batch_size / seconds,
            "ms_per_diffusion_step": 1e3 * seconds / steps,  # the prompt's prefill included
        }
    return results


PARTS = {"gpu_tests": gpu_tests, "attention": attention, "training": training, "sampling": sampling}


# --------------------------------------------------------------------------------------
# The run: each part in a subprocess, limits, the JSON.
# --------------------------------------------------------------------------------------


def environment() -> dict:
    """What ran where; every field is best effort (a missing package is itself a finding)."""
    info: dict = {"python": sys.version.split()[0], "machine": host.node()}
    for name in ("torch", "megatron.core", "triton", "flash_attn"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = getattr(module, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - any import failure is reported, not raised
            info[name] = f"unavailable: {type(e).__name__}: {e}"[:300]
    try:
        from megatron_transfusion import platform

        plat = platform.current()
        info["device"] = platform.device_name() if plat.is_gpu else "cpu"
        info["dtype"] = str(plat.dtype)
        info["datasheet_peak_flops"] = (
            platform.datasheet_peak(info["device"], plat.dtype) if plat.is_gpu else None
        )
    except Exception as e:  # noqa: BLE001
        info["device_error"] = f"{type(e).__name__}: {e}"[:500]
    return info


def _write(report: dict, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)


def _run(cmd: list[str], env: dict, limit: float) -> tuple[str, int | None]:
    """(output, exit status or None if it ran past ``limit`` seconds); on a timeout the whole
    process group goes (a part's pytest, compile workers), not just the process."""
    process = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        return process.communicate(timeout=limit)[0], process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()[0], None


def run_check(dry_run: bool, out: Path, parts: list[str], budget: float) -> dict:
    """Run ``parts`` within ``budget`` seconds; returns (and writes to ``out``) the report."""
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, on any machine
    report = {
        "mode": "dry-run" if dry_run else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_seconds": budget,
        "environment": {},
        "parts": {},
    }
    output, code = _run([sys.executable, "-m", "benchmarks.gpu_check", "--environment"], env, 120)
    try:  # the last line; warnings may come before it
        report["environment"] = json.loads(output.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report["environment"] = {"error": f"exit {code}: {output[-1500:]}"}
    with open(log, "w") as log_file:
        for name in parts:
            left = budget - (time.perf_counter() - start)
            limit = min(LIMITS[name], left)
            entry = {
                "ok": False,
                "seconds": 0.0,
                "limit_seconds": limit,
                "error": None,
                "results": None,
            }
            report["parts"][name] = entry
            if limit < 1:
                entry["error"] = f"not run: {left:.0f} s of the {budget:.0f} s budget were left"
                _write(report, out)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                result_file = Path(tmp) / "result.json"
                cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--run-part", name]
                cmd += ["--part-out", str(result_file)] + (["--dry-run"] if dry_run else [])
                log_file.write(f"==> {name}: {' '.join(cmd[1:])}\n")
                log_file.flush()
                part_start = time.perf_counter()
                output, code = _run(cmd, env, limit)
                entry["seconds"] = time.perf_counter() - part_start
                log_file.write(output + "\n")
                if result_file.exists():
                    entry["results"] = json.loads(result_file.read_text())
                if code is None:
                    entry["error"] = f"timed out after {limit:.0f} s; last output: {output[-800:]}"
                elif code != 0 or not result_file.exists():
                    entry["error"] = f"exit {code}: {output[-1500:]}"
                else:
                    entry["ok"] = True
            print(
                f"{name}: {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']:.0f} s",
                flush=True,
            )
            _write(report, out)
    report["seconds"] = time.perf_counter() - start
    _write(report, out)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny shapes, a few steps (seconds)"
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "runs" / "gpu_check.json"),
        help="the JSON (a .log with every part's output is written beside it)",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="seconds for all parts together (default 450: 8 minutes with the setup)",
    )
    parser.add_argument("--run-part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment:
        print(json.dumps(environment()))
        return
    if args.run_part:
        try:
            results = PARTS[args.run_part](args.dry_run)
        except CheckFailed as e:
            Path(args.part_out).write_text(json.dumps(e.results))
            raise SystemExit(f"check failed: {e}") from None
        Path(args.part_out).write_text(json.dumps(results))
        return
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    report = run_check(args.dry_run, Path(args.out), parts, args.budget)
    failed = [name for name, entry in report["parts"].items() if not entry["ok"]]
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else "; every part ok"))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
