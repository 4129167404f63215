"""Reverse diffusion: from pure noise to a clean latent in a few of the 1000 train steps.

DDPM ancestral sampling on a respaced schedule (the posterior between two kept steps,
Nichol & Dhariwal 2021 §4) or deterministic DDIM (η = 0). The model predicts ε; its
guided prediction comes from the caller (classifier-free guidance lives in generation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_transfusion.diffusion.schedule import CosineSchedule

SAMPLERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class ReverseProcess:
    schedule: CosineSchedule
    steps: int = 250
    sampler: str = "ddpm"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r} (choose from {SAMPLERS})")
        if not 1 <= self.steps <= self.schedule.train_timesteps:
            raise ValueError(f"diffusion steps must be in 1..{self.schedule.train_timesteps}, got {self.steps}")

    def timesteps(self) -> list[int]:
        """Evenly spaced train steps from T-1 down to 0."""
        last = self.schedule.train_timesteps - 1
        return torch.linspace(last, 0, self.steps).round().long().tolist()

    def step(self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
             noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """x_{t_prev} from x_t and the predicted noise ε; t_prev = -1 means "clean".
        ``noise`` (like x_t, standard normal) is the ancestral sampler's fresh noise."""
        abar = self.schedule.alphas_cumprod
        a_t = float(abar[t])
        a_prev = float(abar[t_prev]) if t_prev >= 0 else 1.0
        x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if self.sampler == "ddim":
            return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        beta = 1 - a_t / a_prev  # of the respaced chain
        mean = (a_prev**0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - a_prev) * x_t) / (1 - a_t)
        variance = beta * (1 - a_prev) / (1 - a_t)
        if t_prev < 0 or variance == 0:
            return mean
        return mean + variance**0.5 * noise
