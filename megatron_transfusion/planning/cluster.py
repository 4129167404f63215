"""The hardware a layout runs on: per-device memory, speeds and what the model runs there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_transfusion import platform
from megatron_transfusion.config import ModelConfig

GiB = 2**30


@dataclass(frozen=True)
class Cluster:
    """The hardware a layout runs on, per device (GPU, or process on a CPU)."""

    name: str
    gpus_per_node: int
    memory: float  # bytes a training process may use per device
    peak_flops: float  # dense FLOP/s per device in the compute dtype
    intra_node_bandwidth: float  # bytes/s per device per direction (NVLink)
    inter_node_bandwidth: float  # bytes/s per device per direction (network)
    compute_efficiency: float  # achieved fraction of peak on the executed FLOPs
    comm_efficiency: float  # achieved fraction of the link rate in large collectives
    dtype_bytes: int  # compute dtype: parameters and activations
    attention_backend: Literal["sdpa", "flex"]  # what platform.py picks on this device
    framework_memory: float  # bytes, fixed per process
    fragmentation: float  # allocator overhead, a fraction of the activation memory


CLUSTERS = {
    "h100-80gb": Cluster(
        name="h100-80gb",
        gpus_per_node=8,  # DGX/HGX H100
        # nvidia-smi: 81,559 MiB per H100 SXM5 80GB.
        memory=81_559 * 2**20,
        # H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1,979 is with 2:4 sparsity).
        peak_flops=platform.datasheet_peak("H100 SXM5", torch.bfloat16),
        # NVLink 4: 900 GB/s bidirectional per GPU (datasheet), 450 GB/s each way.
        intra_node_bandwidth=450e9,
        # One 400 Gb/s InfiniBand NDR NIC per GPU (DGX H100): 50 GB/s each way.
        inter_node_bandwidth=50e9,
        # Fitted (the one fitted constant): torchtitan's Llama-3 8B, FSDP bf16 on 8×H100,
        # 5,762 tokens/s/GPU (torchtitan paper, Liang et al. 2024), is 0.30 of peak on the
        # FLOPs it executes (causal attention computes half of 12·L·h·s). torchtitan runs
        # eager PyTorch ops like this project's GPU path (Megatron-Core's local layers,
        # unfused RoPE/SwiGLU, compiled FlexAttention); Megatron-Core with Transformer
        # Engine's fused kernels reaches more (see benchmarks/planner_validation.py).
        compute_efficiency=0.30,
        # Assumption, not measured here (no GPU lent): NCCL's large-message bus bandwidth
        # is ~80% of the link rate (nccl-tests busbw on NVLink/IB systems).
        comm_efficiency=0.8,
        dtype_bytes=2,  # bf16
        attention_backend="flex",
        # Assumption: CUDA context (~0.5 GiB), NCCL communicator buffers of the TP/PP/DP
        # groups, cuBLAS workspaces; the usual 2-4 GiB seen outside PyTorch's allocations.
        framework_memory=3 * GiB,
        # Assumption: PyTorch's caching allocator reserves ~5-10% above what is allocated.
        fragmentation=0.10,
    ),
    "cpu": Cluster(
        name="cpu",
        # This project's CI/dev machine: 2 cores, 23 GiB; one process per core.
        gpus_per_node=2,
        memory=11 * GiB,  # half the RAM per process
        # Half the measured 2-thread fp32 GEMM peak, 172-187 GFLOP/s (benchmarks/README.md).
        peak_flops=90e9,
        # Measured here: gloo all-reduce of 64 MB between 2 processes, 0.85 GB/s bus bandwidth.
        intra_node_bandwidth=0.85e9,
        inter_node_bandwidth=0.85e9,
        # benchmarks/README.md: full training steps reach 42% (tiny) to 72% (25M) of the
        # measured GEMM peak; 0.6 lies between.
        compute_efficiency=0.6,
        comm_efficiency=1.0,  # the bandwidth above is already an achieved figure
        dtype_bytes=4,  # fp32
        attention_backend="sdpa",
        # Measured (benchmarks/peak_memory.py): resident growth beyond the counted tensors is
        # a few MiB per process after a warm-up (thread stacks, Python objects).
        framework_memory=4 * 2**20,
        fragmentation=0.0,  # every tensor ≥ 64 KiB is its own mapping there (see that script)
    ),
}


def attention_backend(m: ModelConfig, cluster: Cluster) -> str:
    """The kernel the model runs on this cluster ("auto": the platform's, as build_model does)."""
    return cluster.attention_backend if m.attention_backend == "auto" else m.attention_backend


def platform_cluster(plat: platform.Platform) -> Cluster:
    """The cluster whose memory model describes ``plat``: on any GPU h100-80gb's (bf16,
    FlexAttention, the CUDA allowance; its memory size and speeds play no part in the
    prediction), on a CPU the cpu one."""
    return CLUSTERS["h100-80gb" if plat.is_gpu else "cpu"]
