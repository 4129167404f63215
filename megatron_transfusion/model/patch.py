"""Image patch layers: latents [n, C, H, W] <-> patch vectors [n, P, hidden].

Two kinds, as in the paper:
- linear: the timestep embedding is added to every k×k patch vector, then one linear
  layer maps it to the transformer width; a linear layer maps back.
- U-Net: down blocks (ResBlocks + stride-2 convs, log2(k) of them) encode the latent to
  a (H/k)×(W/k) grid of hidden vectors; up blocks decode. Plain LayerNorm replaces the
  U-Net's AdaLayerNorm; the timestep enters each ResBlock additively. The down and up
  halves share no skip connections: they sit on the first and last pipeline stages.

These layers are small and replicated on every tensor-parallel rank: their inputs and
output gradients are identical across TP ranks, so their gradients are too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_transfusion.config import ModelConfig


def patchify(latents: torch.Tensor, k: int) -> torch.Tensor:
    """[n, C, H, W] -> [n, (H/k)(W/k), C·k·k], patches in row-major order."""
    n, c, h, w = latents.shape
    x = latents.reshape(n, c, h // k, k, w // k, k)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // k) * (w // k), c * k * k)


def unpatchify(patches: torch.Tensor, k: int, channels: int, size: int) -> torch.Tensor:
    """Inverse of ``patchify`` for square latents of side ``size``."""
    n, g = patches.shape[0], size // k
    x = patches.reshape(n, g, g, channels, k, k)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, size, size)


def timestep_frequencies(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal features of integer timesteps, [n] -> [n, dim]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """DiT's (MAE's) fixed 2-D sin-cos position embedding, [grid², dim] in ``patchify``'s
    row-major order: the first half of the channels encodes the row, the second the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class TimestepEmbedding(nn.Module):
    def __init__(self, out_dim: int, frequency_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = timestep_frequencies(timesteps, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LinearPatchIn(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.timestep_embedding = TimestepEmbedding(cfg.patch_dim, cfg.timestep_frequency_dim)
        self.proj = nn.Linear(cfg.patch_dim, cfg.hidden_size)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        patches = patchify(latents, self.patch_size)
        return self.proj(patches + self.timestep_embedding(timesteps)[:, None, :])


class LinearPatchOut(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.hidden_size, cfg.patch_dim)

    def forward(self, hidden: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        del timesteps  # the linear head is unconditioned, as in the paper
        return unpatchify(
            self.proj(hidden), self.cfg.patch_size, self.cfg.latent_channels, self.cfg.latent_size
        )


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels at every pixel of a [n, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(time)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _res_levels(widths: list[int], in_channels: int, blocks: int, time_dim: int) -> nn.ModuleList:
    """ResBlocks per level, each level ending at its width."""
    levels = nn.ModuleList()
    current = in_channels
    for width in widths:
        levels.append(
            nn.ModuleList(
                ResBlock(current if i == 0 else width, width, time_dim) for i in range(blocks)
            )
        )
        current = width
    return levels


class UNetPatchIn(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = cfg.unet_channels
        time_dim = widths[0]
        self.timestep_embedding = TimestepEmbedding(time_dim, cfg.timestep_frequency_dim)
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.levels = _res_levels(widths, widths[0], cfg.unet_blocks_per_level, time_dim)
        self.downsamples = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride=2, padding=1) for width in widths[:-1]
        )
        self.norm_out = ChannelLayerNorm(widths[-1])
        self.proj = nn.Conv2d(widths[-1], cfg.hidden_size, 1)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        time = self.timestep_embedding(timesteps)
        x = self.conv_in(latents)
        for level, blocks in enumerate(self.levels):
            for block in blocks:
                x = block(x, time)
            if level < len(self.downsamples):
                x = self.downsamples[level](x)
        x = self.proj(F.silu(self.norm_out(x)))  # [n, hidden, H/k, W/k]
        return x.flatten(2).transpose(1, 2)  # [n, P, hidden], row-major like patchify


class UNetPatchOut(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = cfg.unet_channels[::-1]
        time_dim = widths[-1]
        self.grid = cfg.latent_size // cfg.patch_size
        self.timestep_embedding = TimestepEmbedding(time_dim, cfg.timestep_frequency_dim)
        self.proj = nn.Conv2d(cfg.hidden_size, widths[0], 1)
        self.levels = _res_levels(widths, widths[0], cfg.unet_blocks_per_level, time_dim)
        self.upsamples = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=1) for width in widths[:-1]
        )
        self.norm_out = ChannelLayerNorm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, hidden: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        time = self.timestep_embedding(timesteps)
        n, _, d = hidden.shape
        x = self.proj(hidden.transpose(1, 2).reshape(n, d, self.grid, self.grid))
        for level, blocks in enumerate(self.levels):
            for block in blocks:
                x = block(x, time)
            if level < len(self.upsamples):
                x = self.upsamples[level](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))


def build_patch_layers(cfg: ModelConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    """(patch-in, patch-out) classes for ``cfg.patch_layer``."""
    if cfg.patch_layer == "linear":
        return LinearPatchIn, LinearPatchOut
    return UNetPatchIn, UNetPatchOut
