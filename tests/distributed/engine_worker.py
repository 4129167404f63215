"""Under torchrun: three optimizer steps of the Megatron engine in some layout must leave
the same weights as plain torch AdamW in one process (same groups, schedule, clipping).

``--layout reference`` trains with torch AdamW on each step's samples as ONE micro-batch;
other layouts train with MegatronEngine, each data-parallel rank on its share of uneven
micro-batches (at DP=2 one rank sees no image), then compare in the TP=1 view. Losses,
gradient norms and an evaluation of a fourth step's batch are recorded too.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from checkpoints.sharded import model_sharded_state_dict, save_sharded
from megatron_transfusion import platform
from megatron_transfusion.config import load_config
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything
from megatron_transfusion.training.megatron_engine import MegatronEngine
from megatron_transfusion.training.optimizer import build_adamw, set_lr
from megatron_transfusion.training.schedule import lr_at
from megatron_transfusion.training.step import batch_losses, forward_backward
from tests.distributed.equivalence_worker import (
    OVERRIDES,
    full_state,
    load_model_shards,
    micro_batches,
    one_batch,
)

STEPS = 3
LAYOUTS = {
    "reference": [],
    "dp2": [],
    "dp2_zero0": ["parallel.zero_stage=0"],
    "tp2": ["parallel.tensor_parallel=2"],
    "pp2": ["parallel.pipeline_parallel=2"],
    "tp2_sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
}
# Adam's first steps are ~lr·sign(g): where |g| is near 0, float-level differences between
# layouts flip signs. A larger ε keeps the update a smooth function of g, so equality
# tests the engine (grad reduction, clipping, decay groups, lr) rather than rounding.
TRAINING = [
    "optimizer.lr=0.002",
    "optimizer.eps=1e-5",
    "optimizer.warmup_steps=1",
    "optimizer.grad_clip=0.5",
    f"run.train_steps={STEPS}",
    "data.global_batch_tokens=768",
]


def global_micro_batches(cfg, step):
    """Four micro-batches per step, text only and mixed in turn (at DP=2 rank 0 takes the
    text-only ones), different every step."""
    return micro_batches(cfg, seed=100 + step) + micro_batches(cfg, seed=200 + step)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    plat = platform.activate()
    base = load_config("tiny", OVERRIDES + TRAINING)
    cfg = load_config("tiny", OVERRIDES + TRAINING + LAYOUTS[args.layout])
    init_distributed(cfg.parallel, plat)
    seed_everything(1234)
    chunks = build_model(cfg, plat)
    if args.layout == "reference":
        save_sharded(model_sharded_state_dict(chunks), args.workdir / "engine_w0")
        optimizer = build_adamw(chunks, cfg.optimizer)
        params = [p for c in chunks for p in c.parameters()]
        losses, grad_norms = [], []
        for step in range(STEPS):
            optimizer.zero_grad()
            batch = [one_batch(global_micro_batches(cfg, step))]
            report = batch_losses(forward_backward(chunks, batch, cfg.diffusion.loss_weight))
            grad_norms.append(
                float(torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip))
            )
            set_lr(optimizer, lr_at(step, cfg.optimizer, STEPS))
            optimizer.step()
            losses.append(report.total)
        with torch.no_grad():
            batch = [one_batch(global_micro_batches(cfg, STEPS))]
            evaluation = batch_losses(
                forward_backward(chunks, batch, cfg.diffusion.loss_weight, forward_only=True)
            )
    else:
        load_model_shards(chunks, args.workdir / "engine_w0")
        engine = MegatronEngine(cfg, plat, chunks)
        dp, rank = (
            parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(),
        )
        losses, grad_norms = [], []
        for step in range(STEPS):
            mine = global_micro_batches(cfg, step)[rank::dp]
            result = engine.train_step(mine, lr_at(step, cfg.optimizer, STEPS))
            assert not result.skipped
            losses.append(result.losses.total)
            grad_norms.append(result.grad_norm)
        evaluation = engine.evaluate(global_micro_batches(cfg, STEPS)[rank::dp])
    save_sharded(model_sharded_state_dict(chunks), args.workdir / f"engine_w_{args.layout}")
    if dist.get_rank() == 0:
        record = {"losses": losses, "grad_norms": grad_norms, "evaluation": evaluation.as_dict()}
        (args.workdir / f"engine_loss_{args.layout}.json").write_text(json.dumps(record))
    if args.layout == "reference":
        return destroy_distributed()
    parallel_state.destroy_model_parallel()
    init_distributed(base.parallel, plat)
    reference = full_state(base, plat, args.workdir / "engine_w_reference")
    ours = full_state(base, plat, args.workdir / f"engine_w_{args.layout}")
    w0 = full_state(base, plat, args.workdir / "engine_w0")
    if dist.get_rank() == 0:
        diff = {k: float((reference[k] - ours[k]).abs().max()) for k in reference}
        moved = {k: float((reference[k] - w0[k]).abs().max()) for k in reference}
        (args.workdir / f"engine_compare_{args.layout}.json").write_text(
            json.dumps({"diff": diff, "moved": moved})
        )
    destroy_distributed()


if __name__ == "__main__":
    main()
