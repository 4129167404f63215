"""DDPM pieces as pure functions: schedule, noising, (later) sampling steps."""

from megatron_transfusion.diffusion.schedule import CosineSchedule, noise_images

__all__ = ["CosineSchedule", "noise_images"]
