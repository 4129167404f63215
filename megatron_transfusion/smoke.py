"""Overfit one fixed mixed batch: the quickest end-to-end proof that the data, model,
mask, patch layers, losses and the pipeline schedule learn together (single process).
The batch is the loader's first when data is configured, else a synthetic one."""

from __future__ import annotations

import torch

from megatron_transfusion import platform
from megatron_transfusion.config import ExperimentConfig
from megatron_transfusion.data import MixedModalityLoader
from megatron_transfusion.diffusion import CosineSchedule
from megatron_transfusion.loss import LossTerms
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything
from megatron_transfusion.synthetic import random_batch
from megatron_transfusion.training.step import MicroBatch, batch_losses, forward_backward


def overfit(cfg: ExperimentConfig, steps: int, lr: float, log=None) -> list[LossTerms[float]]:
    """Train on one batch whose noise and timesteps are drawn once, so both the LM
    and the diffusion loss can be driven towards zero. Returns the per-step reports."""
    plat = platform.activate()
    init_distributed(cfg.parallel, plat)
    try:
        seed_everything(cfg.run.seed)
        (model,) = build_model(cfg, plat)
        generator = torch.Generator().manual_seed(cfg.run.seed)
        if cfg.data.sources:
            batch = MixedModalityLoader(cfg).next_step()[0]
        else:
            batch = random_batch(
                generator, cfg.model, cfg.data.micro_batch_size, cfg.data.seq_length
            )
        schedule = CosineSchedule.from_config(cfg.diffusion)
        micro_batches = [MicroBatch.draw(batch, schedule, cfg.diffusion, generator, plat.device())]
        o = cfg.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0
        )
        history = []
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            report = batch_losses(
                forward_backward([model], micro_batches, cfg.diffusion.loss_weight)
            )
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            optimizer.step()
            history.append(report)
            if log is not None:
                log(step, report)
        return history
    finally:
        destroy_distributed()
