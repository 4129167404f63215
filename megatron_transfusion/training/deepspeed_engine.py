"""DeepSpeed ZeRO (stages 1–3, optional optimizer offload) over a Megatron-Core TP×DP model.

Megatron-Core builds the tensor-parallel model; DeepSpeed owns the data-parallel gradient
reduction, gradient clipping and the (partitioned) optimizer. Two things make that exact
(measured, see the shared notes on Megatron + DeepSpeed on CPU):

- DeepSpeed must be given an ``mpu`` that describes Megatron's groups. Without it DeepSpeed
  takes the whole world as data parallel, averages the two halves of every TP-split weight
  into each other and counts replicated gradients twice in the norm: silently wrong updates.
- Pipeline parallelism is refused (config validation, like the other combinations this
  engine cannot run): DeepSpeed cannot combine ZeRO-2/3 with it and with Megatron's
  schedules it is silently wrong by default; use the Megatron engine for PP > 1.

Checkpoints are not DeepSpeed's own files (which load only into the same TP and DP sizes)
but the project's dist-checkpoint layout, through DeepSpeed's per-parameter accessors: they
reshard to any layout and resume under either engine.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from megatron.core import parallel_state

from checkpoints.sharded import (
    load_sharded,
    loaded_optimizer_state,
    model_sharded_state_dict,
    optimizer_load_request,
    optimizer_sharded_state,
    parameter_shards,
    save_sharded,
)
from megatron_transfusion import platform
from megatron_transfusion.compat.deepspeed import relink_optimizer_state
from megatron_transfusion.config import BatchGeometry, ExperimentConfig
from megatron_transfusion.loss import LossTerms
from megatron_transfusion.training.engine import Engine, StepResult
from megatron_transfusion.training.optimizer import build_adamw, set_lr
from megatron_transfusion.training.step import GlobalBatch, MicroBatch, make_forward_step

LOAD_GROUP_BYTES = 2**30  # fp32 state + weights read at once per rank when loading


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


def deepspeed_config(
    cfg: ExperimentConfig,
    dtype: torch.dtype,
    offload_optimizer: bool,
    geometry: BatchGeometry,
) -> dict:
    """The whole DeepSpeed config, derived from ours: nothing is read from a JSON file."""
    zero = {"stage": cfg.parallel.zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": geometry.micro_batch_size,
        "gradient_accumulation_steps": geometry.micro_batches,
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
    them inside ``deepspeed.zero.GatheredParameters``.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        model_chunks: list[torch.nn.Module],
        offload_optimizer: bool = False,
    ):
        """``cfg`` is a validated ``parallel.engine=deepspeed`` config (``config.validate``
        refuses what this engine cannot run: PP > 1, sequence parallelism, ZeRO stages
        other than 1-3, asynchronous saves)."""
        self.cfg = cfg
        self.model_chunks = model_chunks
        (model,) = model_chunks
        geometry = BatchGeometry.of(cfg.data, parallel_state.get_data_parallel_world_size())
        self.num_micro_batches = geometry.micro_batches
        config = deepspeed_config(cfg, platform.current().dtype, offload_optimizer, geometry)
        # Checkpoint keys and shapes, taken while every weight is whole (ZeRO-3 partitions
        # them in initialize).
        self._model_state = model_sharded_state_dict(model_chunks)["chunk0"]
        self._params = list(model.parameters())
        self._shapes = [tuple(p.shape) for p in self._params]
        self._shards = parameter_shards(self._model_state, self._params)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=build_adamw(model_chunks, cfg.optimizer),  # the project's decay groups
            config=config,
            mpu=MegatronMPU(),
            dist_init_required=False,
        )

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepResult:
        if len(micro_batches) != self.num_micro_batches:
            raise ValueError(
                f"got {len(micro_batches)} micro-batches, DeepSpeed was configured for "
                f"{self.num_micro_batches} per step (data.global_batch_tokens)"
            )
        set_lr(self.engine.optimizer, lr)
        self.engine.train()
        reports = []
        for i, (total, report) in enumerate(self._losses(micro_batches)):
            reports.append(report)
            if i == len(micro_batches) - 1 and self._any_rank_not_finite(self._stack(reports)):
                # DeepSpeed skips a step whose gradient norm is not finite on every rank
                # (the norm is all-reduced) and discards its reduced gradients; a NaN
                # gradient is the one way to route a bad loss on any rank into that path.
                total = total * math.nan
            self.engine.backward(total)
            self.engine.step()  # updates only at the last micro-batch (the boundary)
        return self._result(self._global_losses(reports))

    def _losses(self, micro_batches: list[MicroBatch]):
        """Each micro-batch through the forward step that Megatron's schedules run, in turn:
        (the loss to differentiate, its share of the global losses). GlobalBatch's
        ``averaged_over`` (M × DP) undoes DeepSpeed's averages over both."""
        forward_step = make_forward_step(
            GlobalBatch.of(micro_batches), self.cfg.diffusion.loss_weight
        )
        batches = iter(micro_batches)
        for _ in micro_batches:
            output, loss = forward_step(batches, self.engine)
            yield loss(output)

    @staticmethod
    def _stack(reports: list[LossTerms[torch.Tensor]]) -> torch.Tensor:
        """[micro-batch, (total, lm, diffusion)]: the shares of the global losses."""
        return torch.stack([torch.stack(r.values()) for r in reports]).float()

    @staticmethod
    def _any_rank_not_finite(values: torch.Tensor) -> bool:
        bad = (~torch.isfinite(values)).any().to(torch.int32).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # the whole world: TP ranks included
        return bool(bad)

    def evaluate(self, micro_batches: list[MicroBatch]) -> LossTerms[float]:
        self.engine.eval()
        with torch.no_grad():
            reports = [report for _, report in self._losses(micro_batches)]
        self.engine.train()
        return LossTerms(*self._global_losses(reports).tolist())

    def _global_losses(self, reports: list[LossTerms[torch.Tensor]]) -> torch.Tensor:
        """[total, lm, diffusion] of the global batch: every rank's shares of it, summed."""
        losses = self._stack(reports).sum(dim=0)
        dist.all_reduce(losses, group=parallel_state.get_data_parallel_group())
        return losses

    def _result(self, losses: torch.Tensor) -> StepResult:
        applied = self.engine.was_step_applied()
        seen = torch.tensor([int(applied), int(not applied)], device=losses.device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if seen.sum() != 1:
            raise RuntimeError("DeepSpeed applied the step on some ranks only")
        return StepResult(
            losses=LossTerms(*losses.tolist()),
            grad_norm=float(self.engine.get_global_grad_norm()),
            skipped=not applied,
        )

    def _ensure_optimizer_state(self) -> None:
        """torch AdamW creates its state at the first update: create what a fresh AdamW
        starts from, so a run can save (or load) before one. Then (re)link each parameter
        to its fragments of that state: ZeRO-1/2 link once, after the first param group's
        update, which leaves the second group's parameters linked to nothing (0.19.8)."""
        zero = self.engine.optimizer
        inner = zero.optimizer
        # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only during a step.
        flats = [p for group in inner.param_groups for p in group["params"]]
        flats += getattr(zero, "fp32_partitioned_groups_flat", [])
        for flat in flats:
            if not inner.state[flat]:
                inner.state[flat] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
        relink_optimizer_state(zero)

    def _load_groups(self) -> list[list[int]]:
        groups, size = [[]], 0
        for index, shape in enumerate(self._shapes):
            nbytes = math.prod(shape) * 16  # fp32 master and moments, weight
            if groups[-1] and size + nbytes > LOAD_GROUP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(index)
            size += nbytes
        return groups

    def _adam_step(self) -> int:
        (step,) = {int(s["step"]) for s in self.engine.optimizer.optimizer.state.values()}
        return step

    def _writer_replica_id(self, index: int) -> tuple:
        """Parameter ``index``'s replica id with its main replica on DP rank ``index % DP``:
        the writes are spread over the data-parallel ranks, and only the writer keeps a copy."""
        key, shard = self._shards[index]
        dp, dp_rank = (
            parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_rank(),
        )
        *others, last = shard.replica_id
        if last != dp_rank:
            raise RuntimeError(
                f"'{key}': replica id {shard.replica_id} does not end in the DP rank {dp_rank}"
            )
        return (*others, (dp_rank - index) % dp)

    def _save_state(self) -> dict:
        """The model (low-precision weights = the masters rounded, as DeepSpeed keeps them)
        and the optimizer. Each tensor is gathered whole (per TP rank) from the ZeRO
        partitions, one at a time; its writer keeps it on the host, the others a placeholder
        of its shape that is never written."""
        self._ensure_optimizer_state()
        model, shards, states = dict(self._model_state), [], []
        for index, param in enumerate(self._params):
            full = {
                "param": safe_get_full_fp32_param(param),  # collectives: every rank takes part
                "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq"),
            }
            replica_id = self._writer_replica_id(index)
            if replica_id[-1] == 0:
                state = {k: v.cpu() for k, v in full.items()}
                weight = state["param"].to(param.dtype)
            else:
                state = {k: torch.empty((), dtype=v.dtype).expand(v.shape) for k, v in full.items()}
                weight = torch.empty((), dtype=param.dtype).expand(full["param"].shape)
            key, shard = self._shards[index]
            model[key] = dataclasses.replace(shard, data=weight, replica_id=replica_id)
            shards.append(model[key])
            states.append(state)
        optimizer = optimizer_sharded_state(
            shards, states, self.engine.optimizer.optimizer.param_groups, self._adam_step()
        )
        return {"model": {"chunk0": model}, "optimizer": optimizer}

    def save(self, directory: Path, background: bool = False) -> None:
        if background:  # config validation refuses checkpoint.async_save with deepspeed
            raise ValueError(
                "the DeepSpeed engine saves synchronously (checkpoint.async_save=false)"
            )
        save_sharded(self._save_state(), directory)

    def load(self, directory: Path) -> None:
        """Parameters are read in groups of about LOAD_GROUP_BYTES: every rank reads each
        tensor whole (per TP rank) and keeps its ZeRO partition."""
        self._ensure_optimizer_state()
        for indices in self._load_groups():
            model = {}
            for i in indices:
                key, shard = self._shards[i]
                model[key] = dataclasses.replace(
                    shard, data=torch.empty(self._shapes[i], dtype=self._params[i].dtype)
                )
            request = {
                "model": {"chunk0": model},
                "optimizer": optimizer_load_request(
                    list(model.values()), [self._shapes[i] for i in indices]
                ),
            }
            loaded = load_sharded(request, directory, part=True)
            states, step = loaded_optimizer_state(loaded["optimizer"])
            for i, state in zip(indices, states, strict=True):
                param = self._params[i]
                safe_set_full_fp32_param(param, state["param"])
                for name in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(param, state[name], name)
                with deepspeed.zero.GatheredParameters(
                    [param], modifier_rank=0
                ):  # whole under ZeRO-3
                    param.data.copy_(loaded["model"]["chunk0"][self._shards[i][0]])
        for state in self.engine.optimizer.optimizer.state.values():
            state["step"] = torch.tensor(float(step))
