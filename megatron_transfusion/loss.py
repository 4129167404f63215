"""L = L_LM + λ·L_DDPM, with both parts reported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class LossTerms(Generic[T]):
    """L and its two parts: tensors where they are computed, floats once reported. Logs,
    metrics files and evaluation reports name them by ``KEYS`` (``as_dict``)."""

    total: T
    lm: T  # next-token cross entropy summed over trained text positions / num_tokens
    diffusion: T  # per-image MSE between ε̂ and ε summed over images / num_images

    KEYS: ClassVar[tuple[str, str, str]] = ("loss", "lm_loss", "diffusion_loss")

    def values(self) -> tuple[T, T, T]:
        return self.total, self.lm, self.diffusion

    def as_dict(self) -> dict[str, T]:
        return dict(zip(self.KEYS, self.values()))

    def map(self, fn: Callable[[T], U]) -> LossTerms[U]:
        return LossTerms(*(fn(value) for value in self.values()))


def transfusion_loss(
    token_losses: torch.Tensor,
    lm_mask: torch.Tensor,
    predicted_noise: torch.Tensor,
    noise: torch.Tensor,
    diffusion_weight: float,
    num_tokens: int | None = None,
    num_images: int | None = None,
    image_weights: torch.Tensor | None = None,
) -> LossTerms[torch.Tensor]:
    """``token_losses`` [b, s] is per-position cross entropy; ``lm_mask`` selects the
    positions that are trained (``PackedBatch.lm_targets``).

    L_LM is a mean over ``num_tokens`` trained tokens and L_DDPM over ``num_images``
    images, by default this batch's own. A micro-batch passes its global batch's counts,
    so that the micro-batches' losses add up to the global batch's means. A count of 0
    gives 0 (its sum is empty), not NaN. ``image_weights`` [n] scale each image's MSE
    (``diffusion.schedule.loss_weights``).
    """
    if num_tokens is None:
        num_tokens = int(lm_mask.sum())
    if num_images is None:
        num_images = predicted_noise.shape[0]
    lm = (token_losses * lm_mask.to(token_losses.dtype)).sum() / max(num_tokens, 1)
    # Zero images give exactly 0 with the patch-out layer in the graph (TransfusionModel._embed).
    per_image = (predicted_noise.float() - noise.float()).pow(2).flatten(1).mean(dim=1)
    if image_weights is not None:
        per_image = per_image * image_weights
    diffusion = per_image.sum() / max(num_images, 1)
    return LossTerms(lm + diffusion_weight * diffusion, lm, diffusion)
