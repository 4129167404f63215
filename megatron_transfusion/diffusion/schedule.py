"""The cosine noise schedule and training-time noising of a batch's images."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_transfusion.batch import PackedBatch
from megatron_transfusion.config import DiffusionConfig

MAX_BETA = 0.999


@dataclass(frozen=True)
class CosineSchedule:
    """Nichol & Dhariwal's cosine schedule: sqrt(ᾱ_t) ≈ cos(t/T · π/2), t = 0..T-1."""

    alphas_cumprod: torch.Tensor  # [T], float64

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> CosineSchedule:
        """The schedule a run trains (and so must sample) with."""
        return cls.create(cfg.train_timesteps)

    @classmethod
    def create(cls, train_timesteps: int = 1000, offset: float = 0.008, max_beta: float = MAX_BETA):
        def f(t):
            return math.cos((t / train_timesteps + offset) / (1 + offset) * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - f(t + 1) / f(t), max_beta) for t in range(train_timesteps)],
            dtype=torch.float64,
        )
        return cls(torch.cumprod(1 - betas, dim=0))

    @property
    def train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def last_uncapped_step(self) -> int:
        """The last t whose β_t = 1 - ᾱ_t/ᾱ_{t-1} is below the cap (the cosine schedule caps
        only t = T-1, where ᾱ falls 1000-fold to ≈ 2.4e-9)."""
        abar = self.alphas_cumprod
        betas = 1 - abar[1:] / abar[:-1]
        uncapped = torch.nonzero(betas < MAX_BETA - 1e-9).flatten()
        return int(uncapped[-1]) + 1 if uncapped.numel() else 0

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε, per image."""
        abar = self.alphas_cumprod.to(clean.device)[timesteps].to(clean.dtype)
        abar = abar.view(-1, *([1] * (clean.dim() - 1)))
        return abar.sqrt() * clean + (1 - abar).sqrt() * noise


def loss_weights(
    timesteps: torch.Tensor, schedule: CosineSchedule, cfg: DiffusionConfig
) -> torch.Tensor | None:
    """Each image's weight in L_DDPM (``diffusion.loss_weighting``); None: all equal."""
    if cfg.loss_weighting == "uniform":
        return None
    abar = schedule.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = abar / (1 - abar)
    return (snr.clamp(max=cfg.min_snr_gamma) / snr).float()


def sample_timesteps(caption_first: torch.Tensor, cfg: DiffusionConfig, generator: torch.Generator):
    """Uniform t per image: over [0, T) after a caption, over [0, limit] before one."""
    limit = torch.where(
        caption_first,
        torch.tensor(cfg.train_timesteps),
        torch.tensor(cfg.image_first_max_timestep + 1),
    )
    uniform = torch.rand(caption_first.shape, generator=generator, dtype=torch.float64)
    return (uniform * limit).long()


def noise_images(
    batch: PackedBatch, schedule: CosineSchedule, cfg: DiffusionConfig, generator: torch.Generator
) -> tuple[PackedBatch, torch.Tensor]:
    """Noise every generated image of ``batch``; returns (noised batch, ε to predict).

    Draws (on ``generator``, CPU, so every rank and device draws alike) the timestep,
    the noise, and whether the image is trained without its context for CFG. Given
    images (``PackedBatch.given``) are drawn for too, so the draws do not depend on them,
    but stay clean at t = 0 and always see their context.
    """
    n = batch.num_images
    caption_first = batch.caption_first.cpu()
    timesteps = sample_timesteps(caption_first, cfg, generator)
    unconditional = torch.rand(n, generator=generator) < cfg.caption_dropout
    noise = torch.randn(batch.latents.shape, generator=generator, dtype=batch.latents.dtype)
    device = batch.latents.device
    generated = ~batch.given.to(device)
    timesteps = timesteps.to(device) * generated
    unconditional = unconditional.to(device) & generated
    noise = noise.to(device)
    noised = batch.replace(
        latents=torch.where(
            generated[:, None, None, None],
            schedule.add_noise(batch.latents, noise, timesteps),
            batch.latents,
        ),
        timesteps=timesteps,
        unconditional=unconditional,
    )
    return noised, noise
