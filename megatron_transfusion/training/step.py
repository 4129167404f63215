"""One global step's forward and backward through Megatron-Core's schedules, and the loss
normalisation that every engine shares.

The same code runs unpipelined (PP=1), 1F1B (PP>1) and interleaved (virtual stages):
every stage receives the micro-batch, because every stage builds the attention mask
from it; only the last stage computes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_transfusion.batch import PackedBatch
from megatron_transfusion.config import DiffusionConfig
from megatron_transfusion.diffusion.schedule import CosineSchedule, loss_weights, noise_images
from megatron_transfusion.loss import LossTerms, transfusion_loss


@dataclass(frozen=True)
class MicroBatch:
    batch: PackedBatch  # images already noised
    noise: torch.Tensor  # the ε each image's prediction is scored against
    image_weights: torch.Tensor | None = None  # each image's weight in L_DDPM; None: equal

    @classmethod
    def draw(
        cls,
        batch: PackedBatch,
        schedule: CosineSchedule,
        cfg: DiffusionConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> MicroBatch:
        """Noise ``batch``'s images and weigh their losses as ``cfg`` says, on ``device``;
        given images weigh 0."""
        noised, noise = noise_images(batch, schedule, cfg, generator)
        weights = loss_weights(noised.timesteps, schedule, cfg)
        if bool(batch.given.any()):
            generated = (~batch.given).float()
            weights = generated if weights is None else weights * generated
        return cls(
            noised.to(device), noise.to(device), None if weights is None else weights.to(device)
        )


@dataclass(frozen=True)
class GlobalBatch:
    """The counts that make the trained loss the paper's over the whole global batch (every
    micro-batch of every data-parallel rank): L_LM the mean over all its trained text
    tokens, L_DDPM the mean over all its generated images, however they fall into micro-batches.

    A micro-batch's loss is its sums divided by these counts, so the micro-batches' losses
    add up to the global batch's. The engines average gradients over micro-batches
    (Megatron's schedule, DeepSpeed's gradient accumulation) and data-parallel ranks, so
    the loss they differentiate is multiplied by ``averaged_over``: the average becomes the
    sum. (Megatron's ``calculate_per_token_loss`` divides by one count after the backward;
    with two, both are counted before it.)
    """

    num_tokens: int
    num_images: int
    averaged_over: int  # micro-batches × data-parallel ranks

    @classmethod
    def of(cls, micro_batches: list[MicroBatch]) -> GlobalBatch:
        """Collective over the data-parallel group (two integers)."""
        tokens = torch.stack([m.batch.lm_targets()[1].sum() for m in micro_batches]).sum()
        counts = torch.stack(
            [tokens, tokens.new_tensor(sum(m.batch.num_generated for m in micro_batches))]
        )
        group = parallel_state.get_data_parallel_group()
        dist.all_reduce(counts, group=group)
        num_tokens, num_images = counts.tolist()
        return cls(num_tokens, num_images, len(micro_batches) * dist.get_world_size(group))

    def loss(self, micro: MicroBatch, lm_mask: torch.Tensor, diffusion_weight: float, output):
        """(the loss to differentiate, this micro-batch's share of the global losses)."""
        loss = transfusion_loss(
            output.token_losses,
            lm_mask,
            output.predicted_noise,
            micro.noise,
            diffusion_weight,
            self.num_tokens,
            self.num_images,
            micro.image_weights,
        )
        # Megatron's schedule divides the returned loss in place: report detached copies.
        return loss.total * self.averaged_over, loss.map(lambda value: value.detach().clone())


def make_forward_step(global_batch: GlobalBatch, diffusion_weight: float):
    def forward_step(data_iterator, model):
        micro: MicroBatch = next(data_iterator)
        labels, lm_mask = micro.batch.lm_targets()
        output = model(micro.batch, labels)
        return output, partial(global_batch.loss, micro, lm_mask, diffusion_weight)

    return forward_step


def forward_backward(
    model_chunks: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    diffusion_weight: float,
    forward_only: bool = False,
) -> list[LossTerms[torch.Tensor]]:
    """Run all micro-batches of this rank; gradients accumulate in the parameters.

    Returns the per-micro-batch shares of the global losses (on the last pipeline stage;
    empty elsewhere): summed over micro-batches and data-parallel ranks, they are the
    global batch's losses (``batch_losses``).
    """
    tokens = micro_batches[0].batch.tokens
    iterators = [iter(micro_batches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(GlobalBatch.of(micro_batches), diffusion_weight),
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )


def batch_losses(reports: list[LossTerms[torch.Tensor]]) -> LossTerms[float]:
    """This rank's micro-batches' shares added up: the global batch's losses when DP = 1."""
    per_term = zip(*(report.values() for report in reports))
    return LossTerms(*(float(torch.stack(shares).sum()) for shares in per_term))
