"""Runs under torchrun: a small Transfusion model trained by ``DeepSpeedEngine``, for
tests/test_deepspeed_engine.py to compare with a plain single-process AdamW reference.

Scenarios (results go to ``<workdir>/<name>.json``, final weights to ``<workdir>/<name>``
through dist-checkpointing, which the test reads back at TP=1):

- ``train``: ``STEPS`` steps, then an evaluation on the next step's data.
- ``nan``: ``NAN_STEPS`` steps; on DP rank 1, step 1 gets a NaN latent (NaN loss and
  gradients) and step 2 a NaN added to its first loss (gradients stay finite, so only the
  engine's loss check can skip it). Records whether those steps left the weights and the
  optimizer state untouched.
- ``checkpoint``: 2 steps, save to ``<name>_ckpt``, 2 steps; then a differently seeded
  model in a fresh engine loads the save and runs the last 2 steps again.
- ``resume``: in the layout and engine given (``--engine megatron`` for PP > 1), a
  differently seeded model loads ``--load`` (DeepSpeed: in groups of 64 KiB of parameters),
  saves it again at once to ``<name>_resaved``, then runs steps 2 and 3.

The data of step ``s`` is the global micro-batches ``0 .. 2·MICRO_BATCHES-1`` (``0 ..
MICRO_BATCHES-1`` at ``--tp 2``), each drawn from its own seed, the first text only (so
the ranks hold different numbers of images and tokens); DP rank ``d`` trains the d-th
contiguous block of them.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from unittest import mock

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from checkpoints.sharded import model_sharded_state_dict, save_sharded
from megatron_transfusion import platform
from megatron_transfusion.config import load_config
from megatron_transfusion.diffusion import CosineSchedule, noise_images
from megatron_transfusion.loss import transfusion_loss
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything
from megatron_transfusion.training import deepspeed_engine
from megatron_transfusion.training.megatron_engine import MegatronEngine
from megatron_transfusion.training.schedule import lr_at
from megatron_transfusion.training.step import MicroBatch
from tests.distributed.equivalence_worker import OVERRIDES, sample_batch

MICRO_BATCHES = 2  # per rank and step
STEPS = 3
NAN_STEPS = 4
POISONED = {1: "latent", 2: "loss"}
SEED = 1234


def config(tp: int = 1, dp: int = 1, pp: int = 1, engine: str = "megatron", zero: int = 1):
    """``dp``: the data-parallel size whose MICRO_BATCHES per rank make the global batch."""
    tokens = 96 * 2 * MICRO_BATCHES * dp  # seq_length × micro_batch_size × micro-batches × DP
    # ε: see tests/distributed/engine_worker.py (the reference sums in another order, so a
    # gradient element near 0 differs by rounding, which Adam's ~sign(g) step would amplify).
    return load_config(
        "tiny",
        OVERRIDES
        + [
            f"parallel.engine={engine}",
            f"parallel.zero_stage={zero}",
            f"parallel.tensor_parallel={tp}",
            f"parallel.pipeline_parallel={pp}",
            f"data.global_batch_tokens={tokens}",
            "optimizer.warmup_steps=2",
            "run.train_steps=4",
            "optimizer.eps=1e-5",
        ],
    )


def lr(cfg, step: int) -> float:
    return lr_at(step, cfg.optimizer, cfg.run.train_steps)


def micro_batches(cfg, step: int, first: int, count: int) -> list[MicroBatch]:
    schedule = CosineSchedule.from_config(cfg.diffusion)
    out = []
    for index in range(first, first + count):
        generator = torch.Generator().manual_seed(1000 * step + index)
        batch = sample_batch(generator, cfg, text_only=index == 0)
        noised, noise = noise_images(batch, schedule, cfg.diffusion, generator)
        out.append(MicroBatch(noised, noise))
    return out


def my_micro_batches(cfg, step: int, poison_latents: bool) -> list[MicroBatch]:
    d = cfg.data
    per_rank = (
        d.global_batch_tokens
        // (d.seq_length * d.micro_batch_size)
        // parallel_state.get_data_parallel_world_size()
    )
    batches = micro_batches(cfg, step, parallel_state.get_data_parallel_rank() * per_rank, per_rank)
    if poison_latents:
        batch = batches[0].batch
        batches[0] = MicroBatch(
            batch.replace(latents=torch.full_like(batch.latents, torch.nan)), batches[0].noise
        )
    return batches


def nan_first_loss():
    """``transfusion_loss`` whose first result has a NaN added outside the autograd graph."""
    calls = []

    def poisoned(*args, **kwargs):
        loss = transfusion_loss(*args, **kwargs)
        calls.append(None)
        return dataclasses.replace(loss, total=loss.total + math.nan) if len(calls) == 1 else loss

    return mock.patch("megatron_transfusion.training.step.transfusion_loss", poisoned)


def snapshot(engine) -> list[torch.Tensor]:
    """Model weights, DeepSpeed's fp32 master partitions and the AdamW state (step included)."""
    inner = engine.engine.optimizer.optimizer  # torch AdamW over the fp32 partitions
    masters = [p for group in inner.param_groups for p in group["params"]]
    moments = [t for p in masters for t in inner.state[p].values()]
    weights = list(engine.model_chunks[0].parameters())
    with deepspeed.zero.GatheredParameters(weights):  # ZeRO-3 keeps a partition per rank
        return [t.detach().clone() for t in weights + masters + moments]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def gather_results(results) -> list:
    """Every rank's StepResults, so the test can check that they agree."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(
        everyone, [{**dataclasses.asdict(r), "losses": r.losses.as_dict()} for r in results]
    )
    return everyone


def train(cfg, engine, steps, poisoned: dict | None = None) -> dict:
    """``poisoned``: {step: "latent" | "loss"}, applied on DP rank 1."""
    results, kept_state = [], []
    on_rank = poisoned if parallel_state.get_data_parallel_rank() == 1 else None
    for step in steps:
        poison = on_rank.get(step) if on_rank else None
        before = snapshot(engine) if poisoned else None
        with nan_first_loss() if poison == "loss" else contextlib.nullcontext():
            batches = my_micro_batches(cfg, step, poison_latents=poison == "latent")
            results.append(engine.train_step(batches, lr(cfg, step)))
        if poisoned:
            kept_state.append(same(before, snapshot(engine)))
    return {"ranks": gather_results(results), "kept_state": kept_state}


def new_engine(cfg, plat, args, seed: int = SEED):
    seed_everything(seed)
    if args.engine == "megatron":
        return MegatronEngine(cfg, plat, build_model(cfg, plat))
    return deepspeed_engine.DeepSpeedEngine(cfg, build_model(cfg, plat), args.offload)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--scenario", choices=["train", "nan", "checkpoint", "resume"], required=True
    )
    parser.add_argument("--engine", choices=["deepspeed", "megatron"], default="deepspeed")
    parser.add_argument("--zero", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--load", type=Path, help="resume: the checkpoint to load")
    parser.add_argument("--bf16", action="store_true", help="the GPU dtype, on this CPU")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--no-mpu", action="store_true")
    parser.add_argument("--name", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    if args.bf16:  # bf16 weights with fp32 masters: the engines' GPU code paths
        bf16 = dataclasses.replace(platform.current(), dtype=torch.bfloat16)
        platform.current = lambda: bf16
    plat = platform.activate()
    # The global batch of the train scenario at DP=2 in every resume layout.
    dp = 2 if args.scenario == "resume" else int(os.environ["WORLD_SIZE"]) // args.tp
    cfg = config(args.tp, dp, args.pp, args.engine, args.zero)
    init_distributed(cfg.parallel, plat)
    # The negative control: DeepSpeed without Megatron's groups.
    without_mpu = mock.patch.object(deepspeed_engine, "MegatronMPU", lambda: None)
    with without_mpu if args.no_mpu else contextlib.nullcontext():
        engine = new_engine(cfg, plat, args)

    if args.scenario == "checkpoint":
        train(cfg, engine, [0, 1])
        engine.save(args.workdir / f"{args.name}_ckpt")
        out = train(cfg, engine, [2, 3])
        resumed = new_engine(cfg, plat, args, seed=SEED + 1)
        resumed.load(args.workdir / f"{args.name}_ckpt")
        out["resumed"] = train(cfg, resumed, [2, 3])["ranks"]
        out["same_weights"] = same(snapshot(engine), snapshot(resumed))
    elif args.scenario == "resume":
        with mock.patch.object(deepspeed_engine, "LOAD_GROUP_BYTES", 2**16):  # many groups
            engine.load(args.load)
        engine.save(args.workdir / f"{args.name}_resaved")
        out = train(cfg, engine, [2, 3])
    elif args.scenario == "nan":
        out = train(cfg, engine, range(NAN_STEPS), POISONED)
    else:
        out = train(cfg, engine, range(STEPS))
        out["evaluation"] = engine.evaluate(
            my_micro_batches(cfg, STEPS, poison_latents=False)
        ).as_dict()
    # ZeRO-3 leaves each rank a partition of every weight: gather them for the export.
    with deepspeed.zero.GatheredParameters(list(engine.model_chunks[0].parameters())):
        save_sharded(model_sharded_state_dict(engine.model_chunks), args.workdir / args.name)
    if dist.get_rank() == 0:
        (args.workdir / f"{args.name}.json").write_text(json.dumps(out))
    destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
