"""DeepSpeed ZeRO (stages 1–3, optional optimizer offload) over a Megatron-Core TP×DP model.

Megatron-Core builds the tensor-parallel model; DeepSpeed owns the data-parallel gradient
reduction, gradient clipping and the (partitioned) optimizer. Two things make that exact
(measured, see the shared notes on Megatron + DeepSpeed on CPU):

- DeepSpeed must be given an ``mpu`` that describes Megatron's groups. Without it DeepSpeed
  takes the whole world as data parallel, averages the two halves of every TP-split weight
  into each other and counts replicated gradients twice in the norm: silently wrong updates.
- Pipeline parallelism is refused: DeepSpeed cannot combine ZeRO-2/3 with it and with
  Megatron's schedules it is silently wrong by default; use the Megatron engine for PP > 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from megatron.core import parallel_state

from megatron_transfusion import platform
from megatron_transfusion.config import ExperimentConfig
from megatron_transfusion.loss import transfusion_loss
from megatron_transfusion.training.engine import Engine, StepResult
from megatron_transfusion.training.optimizer import build_adamw, set_lr
from megatron_transfusion.training.step import MicroBatch

CHECKPOINT_TAG = "ds"


class MegatronMPU:
    """Megatron-Core's parallel groups under the names DeepSpeed 0.19.8 asks an ``mpu`` for.

    DeepSpeed's "model parallel" group is every rank holding a different part of one
    replica: Megatron's TP×PP group. Megatron has no ``get_model_parallel_world_size/rank``.
    """

    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(
        parallel_state.get_tensor_model_parallel_world_size
    )
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_pipeline_model_parallel_group = staticmethod(
        parallel_state.get_pipeline_model_parallel_group
    )
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=parallel_state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=parallel_state.get_model_parallel_group())


def _safe_checkpoint_globals() -> list:
    """The non-tensor objects DeepSpeed pickles into its ZeRO checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine loads with ``weights_only=False`` (arbitrary
    unpickling); this one allows tensors, containers and DeepSpeed's few own types only."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_safe_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


def micro_batches_per_step(cfg: ExperimentConfig, dp_size: int) -> int:
    d = cfg.data
    rows = d.global_batch_tokens // d.seq_length
    if rows % (dp_size * d.micro_batch_size):
        raise ValueError(
            f"config field 'data.global_batch_tokens': {rows} sequences per step do not split "
            f"into {dp_size} data-parallel ranks × micro-batches of {d.micro_batch_size}"
        )
    return rows // (dp_size * d.micro_batch_size)


def deepspeed_config(
    cfg: ExperimentConfig,
    dtype: torch.dtype,
    zero_stage: int,
    offload_optimizer: bool,
    dp_size: int,
) -> dict:
    """The whole DeepSpeed config, derived from ours: nothing is read from a JSON file."""
    zero = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": micro_batches_per_step(cfg, dp_size),
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        # With bf16, DeepSpeed keeps fp32 master weights; its overflow check is what skips
        # non-finite steps. No fp16: no loss scaling.
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True},
        "fp16": {"enabled": False},
        # Our optimizer is a torch AdamW; offloaded partitions are updated by it on the CPU.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    """One model replica per data-parallel rank, TP-split by Megatron, ZeRO-sharded by DeepSpeed.

    Under ZeRO-3 each rank's ``model_chunks`` hold only partitions of the weights: read
    them inside ``deepspeed.zero.GatheredParameters``. Checkpoints load into the same TP
    and DP sizes only (other layouts need DeepSpeed's universal-checkpoint conversion).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        model_chunks: list[torch.nn.Module],
        zero_stage: int,
        offload_optimizer: bool = False,
    ):
        if cfg.parallel.pipeline_parallel > 1 or len(model_chunks) != 1:
            raise ValueError(
                "the DeepSpeed engine does not support pipeline parallelism "
                f"(parallel.pipeline_parallel={cfg.parallel.pipeline_parallel}): DeepSpeed cannot "
                "combine ZeRO-2/3 with it and is silently wrong with Megatron's schedules; "
                "use the megatron engine for PP > 1"
            )
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {zero_stage}")
        self.cfg = cfg
        self.model_chunks = model_chunks
        (model,) = model_chunks
        dp_size = parallel_state.get_data_parallel_world_size()
        self.num_micro_batches = micro_batches_per_step(cfg, dp_size)
        config = deepspeed_config(
            cfg, platform.current().dtype, zero_stage, offload_optimizer, dp_size
        )
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=build_adamw(model_chunks, cfg.optimizer),  # the project's decay groups
            config=config,
            mpu=MegatronMPU(),
            dist_init_required=False,
        )
        self.engine.checkpoint_engine = _WeightsOnlyCheckpointEngine(self.engine._config)

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepResult:
        if len(micro_batches) != self.num_micro_batches:
            raise ValueError(
                f"got {len(micro_batches)} micro-batches, DeepSpeed was configured for "
                f"{self.num_micro_batches} per step (data.global_batch_tokens)"
            )
        set_lr(self.engine.optimizer, lr)
        self.engine.train()
        reports = []
        for i, micro in enumerate(micro_batches):
            loss = self._forward(micro)
            reports.append(torch.stack([loss.total, loss.lm, loss.diffusion]).detach().float())
            total = loss.total
            if i == len(micro_batches) - 1 and self._any_rank_not_finite(torch.stack(reports)):
                # DeepSpeed skips a step whose gradient norm is not finite on every rank
                # (the norm is all-reduced) and discards its reduced gradients; a NaN
                # gradient is the one way to route a bad loss on any rank into that path.
                total = total * math.nan
            self.engine.backward(total)
            self.engine.step()  # updates only at the last micro-batch (the boundary)
        return self._result(torch.stack(reports).mean(dim=0))

    def _forward(self, micro: MicroBatch):
        labels, lm_mask = micro.batch.lm_targets()
        output = self.engine(micro.batch, labels)
        return transfusion_loss(
            output.token_losses,
            lm_mask,
            output.predicted_noise,
            micro.noise,
            self.cfg.diffusion.loss_weight,
        )

    @staticmethod
    def _any_rank_not_finite(values: torch.Tensor) -> bool:
        bad = (~torch.isfinite(values)).any().to(torch.int32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # the whole world: TP ranks included
        return bool(bad)

    def evaluate(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        self.engine.eval()
        with torch.no_grad():
            losses = [self._forward(micro) for micro in micro_batches]
        self.engine.train()
        local = torch.stack([torch.stack([x.total, x.lm, x.diffusion]).float() for x in losses]).mean(0)
        return dict(zip(("loss", "lm_loss", "diffusion_loss"), self._dp_mean(local).tolist()))

    @staticmethod
    def _dp_mean(local_means: torch.Tensor) -> torch.Tensor:
        dp_group = parallel_state.get_data_parallel_group()
        means = local_means.clone()
        dist.all_reduce(means, group=dp_group)
        return means / dist.get_world_size(group=dp_group)

    def _result(self, local_means: torch.Tensor) -> StepResult:
        means = self._dp_mean(local_means)
        applied = self.engine.was_step_applied()
        seen = torch.tensor([int(applied), int(not applied)], device=means.device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if seen.sum() != 1:
            raise RuntimeError("DeepSpeed applied the step on some ranks only")
        loss, lm_loss, diffusion_loss = means.tolist()
        return StepResult(
            losses={"loss": loss, "lm_loss": lm_loss, "diffusion_loss": diffusion_loss},
            grad_norm=float(self.engine.get_global_grad_norm()),
            skipped=not applied,
        )

    def save(self, directory: Path, background: bool = False) -> None:
        if background:  # config validation refuses checkpoint.async_save with deepspeed
            raise ValueError("the DeepSpeed engine saves synchronously (checkpoint.async_save=false)")
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory),
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{CHECKPOINT_TAG}' under {directory}")
