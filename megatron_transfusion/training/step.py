"""One global step's forward and backward through Megatron-Core's schedules.

The same code runs unpipelined (PP=1), 1F1B (PP>1) and interleaved (virtual stages):
every stage receives the micro-batch, because every stage builds the attention mask
from it; only the last stage computes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_transfusion.batch import PackedBatch
from megatron_transfusion.loss import transfusion_loss


@dataclass(frozen=True)
class MicroBatch:
    batch: PackedBatch  # images already noised
    noise: torch.Tensor  # the ε each image's prediction is scored against


def _loss_func(micro: MicroBatch, lm_mask: torch.Tensor, diffusion_weight: float, output):
    loss = transfusion_loss(
        output.token_losses, lm_mask, output.predicted_noise, micro.noise, diffusion_weight
    )
    # The schedule divides the returned loss in place: report detached copies.
    report = {
        "loss": loss.total.detach().clone(),
        "lm_loss": loss.lm.detach().clone(),
        "diffusion_loss": loss.diffusion.detach().clone(),
    }
    return loss.total, report


def make_forward_step(diffusion_weight: float):
    def forward_step(data_iterator, model):
        micro: MicroBatch = next(data_iterator)
        labels, lm_mask = micro.batch.lm_targets()
        output = model(micro.batch, labels)
        return output, partial(_loss_func, micro, lm_mask, diffusion_weight)

    return forward_step


def forward_backward(
    model_chunks: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    diffusion_weight: float,
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Run all micro-batches; gradients accumulate in the parameters.

    Returns the per-micro-batch loss reports (on the last pipeline stage; empty elsewhere).
    """
    tokens = micro_batches[0].batch.tokens
    iterators = [iter(micro_batches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(diffusion_weight),
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def mean_report(reports: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    return {key: float(torch.stack([r[key] for r in reports]).mean()) for key in reports[0]}
