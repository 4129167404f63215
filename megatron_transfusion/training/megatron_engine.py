"""Megatron-Core DDP + optimizer: every TP/PP/DP layout, ZeRO-1 via the distributed optimizer.

The distributed optimizer runs only where there is something to shard (data-parallel size
> 1): on one replica it would copy whole buffers each step for nothing, so the plain
optimizer does the same update there. Both write the same checkpoint layout
(``checkpoints.sharded.optimizer_sharded_state``), so a run moves freely between them.

Gradients accumulate in Megatron's contiguous buffers across micro-batches and are
reduced (all-reduce, or reduce-scatter for the distributed optimizer) once per step,
bucket by bucket while the last micro-batch's backward still runs; ``finalize_model_grads``
waits for them. Before updating, the global loss and gradient norm are checked:
non-finite on any rank means no rank updates (both values are already global, so every
rank decides alike).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from checkpoints.sharded import (
    load_sharded,
    loaded_optimizer_state,
    model_sharded_state_dict,
    optimizer_load_request,
    optimizer_sharded_state,
    parameter_shards,
    save_sharded,
)
from megatron_transfusion.compat.megatron_core import load_distributed_optimizer_state
from megatron_transfusion.config import ExperimentConfig
from megatron_transfusion.loss import LossTerms
from megatron_transfusion.platform import Platform
from megatron_transfusion.training.engine import Engine, StepResult
from megatron_transfusion.training.optimizer import no_decay_parameter_ids
from megatron_transfusion.training.step import MicroBatch, batch_losses, forward_backward


class MegatronEngine(Engine):
    def __init__(self, cfg: ExperimentConfig, plat: Platform, model_chunks: list[torch.nn.Module]):
        self.cfg = cfg
        self.distributed_optimizer = distributed_optimizer = (
            cfg.parallel.zero_stage == 1 and parallel_state.get_data_parallel_world_size() > 1
        )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            # Buckets start reducing during the last micro-batch's backward, as soon as their
            # gradients are complete (exact over gloo too: see the engine tests).
            overlap_grad_reduce=True,
            use_distributed_optimizer=distributed_optimizer,
        )
        config = model_chunks[0].config
        self.model_chunks = [
            DistributedDataParallel(
                config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
            )
            for i, chunk in enumerate(model_chunks)
        ]
        # The schedules reduce gradients through these hooks, once per step.
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [chunk.no_sync for chunk in self.model_chunks]
        config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        start_sync = [chunk.start_grad_sync for chunk in self.model_chunks]  # per virtual stage
        config.grad_sync_func = start_sync if len(start_sync) > 1 else start_sync[0]
        exempt = no_decay_parameter_ids(model_chunks)
        no_decay = ParamKey(
            with_name_predicate=ParamWithNamePredicate(
                name="no_decay", fn=lambda param, name: id(param) in exempt
            )
        )
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.beta1,
                adam_beta2=o.beta2,
                adam_eps=o.eps,
                clip_grad=o.grad_clip,
                bf16=plat.dtype == torch.bfloat16,
                params_dtype=plat.dtype,
                use_distributed_optimizer=distributed_optimizer,
            ),
            self.model_chunks,
            config_overrides={no_decay: ParamGroupOverride(wd_mult=0.0)},
        )
        # Megatron's LR scheduler would apply the multipliers; this loop sets lr itself.
        for group in self.optimizer.param_groups:
            group["weight_decay"] = o.weight_decay * group.get("wd_mult", 1.0)

    def _global_losses(self, reports: list[LossTerms[torch.Tensor]]) -> torch.Tensor:
        """[total, lm, diffusion] of the global batch, on every rank: the micro-batches'
        shares summed over DP ranks."""
        values = torch.zeros(len(LossTerms.KEYS), dtype=torch.float64)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            values = torch.tensor(batch_losses(reports).values(), dtype=torch.float64)
            dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        dist.broadcast(
            values,
            parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return values

    def train_step(self, micro_batches: list[MicroBatch], lr: float) -> StepResult:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = forward_backward(self.model_chunks, micro_batches, self.cfg.diffusion.loss_weight)
        losses = self._global_losses(reports)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        skipped = not (math.isfinite(grad_norm) and bool(torch.isfinite(losses).all()))
        if not skipped:
            self.optimizer.step()  # clips to the configured norm, then updates
        return StepResult(LossTerms(*losses.tolist()), grad_norm, skipped)

    def evaluate(self, micro_batches: list[MicroBatch]) -> LossTerms[float]:
        with torch.no_grad():
            reports = forward_backward(
                self.model_chunks, micro_batches, self.cfg.diffusion.loss_weight, forward_only=True
            )
        return LossTerms(*self._global_losses(reports).tolist())

    def _sharded_state(self, is_loading: bool) -> dict:
        model_state = model_sharded_state_dict([c.module for c in self.model_chunks])
        merged = {k: v for state in model_state.values() for k, v in state.items()}
        self._ensure_optimizer_state()
        if self.distributed_optimizer:
            optimizer_state = self.optimizer.sharded_state_dict(
                merged,
                is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": "fully_reshardable"},
            )
        else:
            optimizer_state = self._plain_sharded_state(merged, is_loading)
        return {"model": model_state, "optimizer": optimizer_state}

    def save(self, directory: Path, background: bool = False):
        return save_sharded(self._sharded_state(is_loading=False), directory, background)

    def load(self, directory: Path) -> None:
        state = load_sharded(self._sharded_state(is_loading=True), directory)
        for i, chunk in enumerate(self.model_chunks):
            chunk.module.load_state_dict(state["model"][f"chunk{i}"])
        if self.distributed_optimizer:
            load_distributed_optimizer_state(
                self.optimizer, state["optimizer"], self._distributed_optimizers()
            )
        else:
            self._load_plain_optimizer(state["optimizer"])

    def _optimizers(self) -> list:
        """Megatron's optimizers, one per parameter dtype group (a ChainedOptimizer or one)."""
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    # The plain optimizer: torch AdamW over fp32 main parameters (the model's own in fp32).

    def _plain_parameters(
        self,
    ) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter, torch.optim.Optimizer]]:
        """(model parameter, its fp32 main parameter, the torch optimizer updating it)."""
        out = []
        for opt in self._optimizers():
            if isinstance(opt, Float16OptimizerWithFloat16Params):
                pairs = [
                    pair
                    for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups)
                    for pair in zip(models, mains)
                ]
                pairs += [(p, p) for group in opt.fp32_from_fp32_groups for p in group]
            else:
                pairs = [(p, p) for group in opt.optimizer.param_groups for p in group["params"]]
            out += [(model, main, opt.optimizer) for model, main in pairs]
        return out

    def _plain_sharded_state(self, model_state: dict, is_loading: bool) -> dict:
        entries = self._plain_parameters()
        shards = [
            shard for _, shard in parameter_shards(model_state, [model for model, _, _ in entries])
        ]
        if is_loading:
            return optimizer_load_request(shards, [tuple(model.shape) for model, _, _ in entries])
        states = [
            {
                "param": main.detach(),
                "exp_avg": adam.state[main]["exp_avg"],
                "exp_avg_sq": adam.state[main]["exp_avg_sq"],
            }
            for _, main, adam in entries
        ]
        (step,) = {int(adam.state[main]["step"]) for _, main, adam in entries}
        return optimizer_sharded_state(shards, states, self.optimizer.param_groups, step)

    def _load_plain_optimizer(self, optimizer_state: dict) -> None:
        states, step = loaded_optimizer_state(optimizer_state)
        for (_, main, adam), state in zip(self._plain_parameters(), states, strict=True):
            with torch.no_grad():
                main.copy_(state["param"])
            adam.state[main] = {
                "step": torch.tensor(float(step)),
                "exp_avg": state["exp_avg"].to(main),
                "exp_avg_sq": state["exp_avg_sq"].to(main),
            }

    def _ensure_optimizer_state(self) -> None:
        """Checkpoints need torch AdamW's per-parameter state, which only exists after a
        first update (and a run may save before one, e.g. when every step so far was
        skipped): create the state a fresh AdamW would start from."""
        for opt in self._optimizers():
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    if param not in opt.optimizer.state:
                        opt.optimizer.state[param] = {
                            "step": torch.tensor(0.0),
                            "exp_avg": torch.zeros_like(param),
                            "exp_avg_sq": torch.zeros_like(param),
                        }

    # The distributed optimizer.

    def _distributed_optimizers(self) -> list[DistributedOptimizer]:
        return [o for o in self._optimizers() if isinstance(o, DistributedOptimizer)]
