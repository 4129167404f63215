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
# Where the respaced chain starts; it then runs evenly down to t = 0.
#   leading: steps ⌊i·T/steps⌋, i < steps (0, 4, ..., 996 for 250 of 1000), as DDIM does;
#   uncapped: the last train step whose β was not capped (T - 2 for the cosine schedule);
#   trailing: T - 1, the step whose β the cosine schedule caps at 0.999 (ᾱ ≈ 2.4e-9).
SPACINGS = ("leading", "uncapped", "trailing")


@dataclass(frozen=True)
class ReverseProcess:
    schedule: CosineSchedule
    steps: int = 250
    sampler: str = "ddpm"
    spacing: str = "leading"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r} (choose from {SAMPLERS})")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.spacing!r} (choose from {SPACINGS})")
        if not 1 <= self.steps <= self.schedule.train_timesteps:
            raise ValueError(
                f"diffusion steps must be in 1..{self.schedule.train_timesteps}, got {self.steps}"
            )

    def timesteps(self) -> list[int]:
        """The respaced chain, from its start (see ``SPACINGS``) evenly down to 0.

        An ε-model's x̂₀ = (x_t - √(1-ᾱ_t)·ε̂)/√ᾱ_t multiplies ε̂'s error by √(ᾱ_prev/ᾱ_t) in
        the next x: ~100× from the capped step t = T-1 of the cosine schedule, ~2× from the
        others. ``trailing`` therefore throws the first update far off the data."""
        T = self.schedule.train_timesteps
        if self.spacing == "leading":
            return [i * T // self.steps for i in reversed(range(self.steps))]
        start = T - 1 if self.spacing == "trailing" else self.schedule.last_uncapped_step
        return torch.linspace(start, 0, self.steps).round().long().unique_consecutive().tolist()

    def step(
        self, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, noise: torch.Tensor
    ) -> torch.Tensor:
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
