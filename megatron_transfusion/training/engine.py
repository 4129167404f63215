"""One interface over the ways a step can be executed and its state sharded.

- ``MegatronEngine``: Megatron-Core DDP + optimizer (the distributed optimizer is ZeRO-1:
  sharded optimizer state); works for every TP/PP/DP layout, through the pipeline schedules.
- ``DeepSpeedEngine``: DeepSpeed ZeRO stages 1–3 (and offload) for TP×DP layouts; DeepSpeed
  cannot combine ZeRO-2/3 with pipeline parallelism, and its pipeline support is fragile
  with Megatron's schedules, so config validation refuses PP > 1 with it.

The trainer sees only ``train_step``, ``evaluate``, ``save`` and ``load``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_transfusion.loss import LossTerms
from megatron_transfusion.training.step import MicroBatch


@dataclass(frozen=True)
class StepResult:
    """Outcome of one optimizer step, identical on every rank."""

    losses: LossTerms[float]  # the global batch's (see GlobalBatch)
    grad_norm: float  # global L2 norm before clipping (inf/nan if not finite)
    skipped: bool  # the update was skipped because loss or gradients were not finite


class Engine(ABC):
    model_chunks: list[torch.nn.Module]

    @abstractmethod
    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepResult:
        """Zero grads, forward+backward every micro-batch of this rank, reduce gradients
        over data-parallel ranks, clip to the configured norm, then update with ``lr``.
        The gradient is that of the loss of the whole global batch (``GlobalBatch``).
        If the loss or the gradient norm is not finite on any rank, no rank updates."""

    @abstractmethod
    def evaluate(self, micro_batches: list[MicroBatch]) -> LossTerms[float]:
        """Forward only: the losses of every rank's micro-batches taken as one batch,
        identical on every rank. Nothing is updated."""

    @abstractmethod
    def save(self, directory: Path, background: bool = False):
        """Collective: model and optimizer state of every rank under ``directory``. With
        ``background`` (where supported) the state is copied now and written by a thread:
        returns the write, whose collective ``finish()`` completes it; else None."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Collective: restore what ``save`` wrote (the layout may differ where supported)."""
