"""L = L_LM + λ·L_DDPM, with both parts reported."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TransfusionLoss:
    total: torch.Tensor
    lm: torch.Tensor  # mean next-token cross entropy over trained text positions
    diffusion: torch.Tensor  # mean over images of the per-image MSE between ε̂ and ε
    num_tokens: int
    num_images: int


def transfusion_loss(
    token_losses: torch.Tensor,
    lm_mask: torch.Tensor,
    predicted_noise: torch.Tensor,
    noise: torch.Tensor,
    diffusion_weight: float,
) -> TransfusionLoss:
    """``token_losses`` [b, s] is per-position cross entropy; ``lm_mask`` selects the
    positions that are trained (``PackedBatch.lm_targets``)."""
    mask = lm_mask.to(token_losses.dtype)
    num_tokens = int(lm_mask.sum())
    lm = (token_losses * mask).sum() / max(num_tokens, 1)
    num_images = predicted_noise.shape[0]
    if num_images:
        per_image = (predicted_noise.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
        diffusion = per_image.mean()
    else:  # exactly 0, but keeps the patch-out layer in the graph (see TransfusionModel._embed)
        diffusion = predicted_noise.float().sum()
    return TransfusionLoss(lm + diffusion_weight * diffusion, lm, diffusion, num_tokens, num_images)
