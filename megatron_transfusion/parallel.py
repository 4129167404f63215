"""Process groups and seeds: torch.distributed + Megatron-Core parallel state."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_transfusion.config import ConfigError, DistributedConfig, ParallelConfig
from megatron_transfusion.platform import Platform


def init_distributed(
    parallel: ParallelConfig,
    platform: Platform,
    timeout_minutes: float = DistributedConfig.timeout_minutes,
) -> None:
    """Join the job's process group (torchrun's env://, or a world of one) and build the
    TP/PP/DP groups; the DP size is whatever world size is left over. A collective on any
    of them that waits longer than ``timeout_minutes`` fails instead of hanging."""
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if "RANK" in os.environ:  # launched by torchrun / srun: env:// rendezvous
            dist.init_process_group(backend=platform.dist_backend, timeout=timeout)
        else:  # a plain `python` run: a world of one, no port to race for
            dist.init_process_group(
                backend=platform.dist_backend,
                store=dist.HashStore(),
                rank=0,
                world_size=1,
                timeout=timeout,
            )
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    world = dist.get_world_size()
    if world % model_parallel:
        raise ConfigError(
            f"config field 'parallel.tensor_parallel': world size {world} is not a multiple of "
            f"parallel.tensor_parallel × parallel.pipeline_parallel = {model_parallel}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        distributed_timeout_minutes=timeout_minutes,
    )


def seed_everything(seed: int) -> None:
    """Same seed on every rank for replicated state; Megatron derives per-TP-rank
    streams for sharded state from it."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
