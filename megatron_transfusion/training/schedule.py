"""The learning-rate schedule: linear warmup, cosine decay to min_lr, then constant.

Steps count optimizer updates from 0. Warmup ends *on* its last step rather than one
after it, so no update is taken at lr 0:

    step < W:        lr·(step+1)/W                      (step 0: lr/W, step W-1: lr)
    W ≤ step < D:    min_lr + (lr-min_lr)·(1 + cos(π·(step-W)/(D-W)))/2   (step W: lr)
    step ≥ D:        min_lr

with W = warmup_steps and D = decay_steps or train_steps, the step where decay ends
(an absolute step, like Megatron's lr_decay_iters, not a length after warmup).
"""

from __future__ import annotations

import math

from megatron_transfusion.config import OptimizerConfig


def lr_at(step: int, cfg: OptimizerConfig, train_steps: int) -> float:
    if step < 0:
        raise ValueError(f"step must be ≥ 0, got {step}")
    warmup = cfg.warmup_steps
    decay_end = cfg.decay_steps if cfg.decay_steps is not None else train_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if step >= decay_end:
        return cfg.min_lr
    progress = (step - warmup) / (decay_end - warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
