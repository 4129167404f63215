"""The only module that knows whether a GPU exists.

On a GPU the project runs as Megatron-Core expects: NCCL, bf16, FlexAttention.
On a CPU-only machine it runs the *same* code over gloo in fp32 with dense-mask SDPA,
after giving Megatron-Core's own modules CPU stand-ins for the handful of ``torch.cuda``
calls they make. It also knows what MFU and memory are measured against: a GPU's
datasheet peak (a CPU's is measured), and the allocator's (GPU) or the process's (CPU)
peak memory; and what a profile can record (kernels and allocator history: GPU only).
The stand-ins are scoped: only ``megatron.*`` modules see them (each gets a ``torch``
proxy whose ``cuda`` attribute is replaced), so torch itself, torch.compile and every other
library keep the real ``torch.cuda``. Handing them to Megatron patches its and torch's
internals; those patches live in ``compat``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_transfusion.compat import megatron_core
from megatron_transfusion.compat import torch as torch_compat
from megatron_transfusion.config import ConfigError

# Dense tensor-core peaks (without 2:4 sparsity) from NVIDIA's datasheets, FLOP/s per GPU,
# per compute dtype; the first pattern found in ``device_name()`` wins. SXM parts unless named.
DATASHEET_PEAKS: tuple[tuple[str, dict[torch.dtype, float]], ...] = (
    (r"H100.*PCIe", {torch.bfloat16: 756e12}),
    (r"H[12]00 NVL", {torch.bfloat16: 835e12}),
    (r"H100|H200|GH200", {torch.bfloat16: 989e12}),
    (r"A100", {torch.bfloat16: 312e12}),
)

# Allocations a memory snapshot remembers (torchtitan's figure): the last steps of a large
# model, at a few hundred bytes each.
MEMORY_HISTORY_ENTRIES = 100_000


@dataclass(frozen=True)
class Platform:
    """What the device world looks like; every device-dependent choice reads it."""

    name: str  # "cuda" or "cpu"
    dist_backend: str  # "nccl" or "gloo"
    dtype: torch.dtype  # compute dtype of the transformer
    attention_backend: str  # default attention kernel: "flex" or "sdpa"

    @property
    def is_gpu(self) -> bool:
        return self.name == "cuda"

    def device(self) -> torch.device:
        """This process's device: on a GPU the one ``activate`` selected (its local rank),
        so that the ranks of a node each use their own."""
        return torch.device("cuda", current_gpu()) if self.is_gpu else torch.device("cpu")

    def peak_flops(self) -> float:
        """Dense FLOP/s of one device in the compute dtype, what MFU divides by: the GPU's
        datasheet figure (a GPU not in ``DATASHEET_PEAKS`` needs ``run.peak_flops``), or on
        CPU a measured fp32 GEMM, as no datasheet applies there."""
        if not self.is_gpu:
            return measure_matmul_peak()
        return datasheet_peak(device_name(), self.dtype)

    def peak_memory(self) -> int:
        """Bytes at this process's high-water mark so far: on GPU what PyTorch's allocator
        had allocated (the planner's tensors; not the CUDA context or the cache), on CPU the
        resident set (VmHWM, everything the process touched)."""
        if self.is_gpu:
            return gpu_peak_allocated()
        # Linux's VmHWM: unlike getrusage's maxrss, it does not carry a parent's peak across exec.
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024

    def profiler_activities(self) -> list[torch.profiler.ProfilerActivity]:
        """What torch.profiler traces: the host's ops, and on a GPU its kernels too."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.is_gpu:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        return activities

    def record_memory_history(self) -> bool:
        """Start recording every allocation with its stack, for ``dump_memory_snapshot``.
        False on CPU: only CUDA's caching allocator keeps such a history."""
        if not self.is_gpu:
            return False
        torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        return True

    def dump_memory_snapshot(self, path: Path) -> None:
        """The recorded allocations and the allocator's segments, a pickle that
        https://pytorch.org/memory_viz draws."""
        torch.cuda.memory._dump_snapshot(str(path))


def gpu_available() -> bool:
    return torch.cuda.is_available()


def current_gpu() -> int:
    return torch.cuda.current_device()


def device_name() -> str:
    """The GPU's name as the driver reports it, e.g. 'NVIDIA H100 80GB HBM3'."""
    return torch.cuda.get_device_name()


def gpu_peak_allocated() -> int:
    return torch.cuda.max_memory_allocated()


def datasheet_peak(name: str, dtype: torch.dtype) -> float:
    for pattern, peaks in DATASHEET_PEAKS:
        if re.search(pattern, name) and dtype in peaks:
            return peaks[dtype]
    raise ConfigError(
        f"config field 'run.peak_flops': no datasheet peak is known for '{name}' "
        f"in {dtype}; set it to the GPU's dense FLOP/s in that dtype, for "
        "MFU"
    )


def measure_matmul_peak(seconds: float = 1.0, size: int = 2048, dtype=torch.float32) -> float:
    """Dense-GEMM FLOP/s of this machine's CPU, with the threads this process has: the
    fastest of the GEMMs run in ``seconds``. Other processes only ever slow a GEMM down, so
    the fastest is the machine's rate; the average over a busy second once came out at a
    tenth of it here, and MFU at 800%."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(2):  # warm-up: thread pool start, first-touch allocation
        torch.matmul(a, b)
    fastest, start = math.inf, time.perf_counter()
    while (now := time.perf_counter()) - start < seconds or fastest == math.inf:
        torch.matmul(a, b)
        fastest = min(fastest, time.perf_counter() - now)
    return 2.0 * size**3 / fastest


@functools.cache
def current() -> Platform:
    if gpu_available():
        return Platform("cuda", "nccl", torch.bfloat16, "flex")
    return Platform("cpu", "gloo", torch.float32, "sdpa")


def activate(local_rank: int | None = None) -> Platform:
    """Call once from every entry point before building Megatron-Core objects."""
    platform = current()
    if platform.is_gpu:
        rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        torch.cuda.set_device(rank)
    else:
        install_cpu_stand_ins()
    return platform


# --------------------------------------------------------------------------------------
# CPU stand-ins for Megatron-Core
# --------------------------------------------------------------------------------------


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: on CPU every op is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def elapsed_time(self, other) -> float:
        return 0.0

    def query(self) -> bool:
        return True


def _seed_cpu_generator(seed) -> None:
    # A no-op here would give every TP rank the same "model-parallel" RNG stream
    # (see shared notes): the CPU generator is the device generator on CPU.
    torch.default_generator.manual_seed(int(seed))


def _make_cuda_stand_in(real_cuda) -> types.ModuleType:
    cuda = types.ModuleType("torch.cuda (cpu stand-in)")
    nvtx = types.SimpleNamespace(
        range_push=lambda *a, **k: None,
        range_pop=lambda *a, **k: None,
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=lambda *a, **k: None,
    )
    stand_ins = dict(
        is_available=lambda: False,
        current_device=lambda: torch.device("cpu"),
        device_count=lambda: 1,
        set_device=lambda *a, **k: None,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=_seed_cpu_generator,
        manual_seed_all=_seed_cpu_generator,
        Stream=_NullStream,
        Event=_NullStream,
        current_stream=lambda *a, **k: _NullStream(),
        default_stream=lambda *a, **k: _NullStream(),
        stream=lambda *a, **k: contextlib.nullcontext(),
        nvtx=nvtx,
        memory_stats=lambda *a, **k: {},
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        memory_reserved=lambda *a, **k: 0,
    )
    cuda.__dict__.update(stand_ins)
    cuda.random = types.SimpleNamespace(
        get_rng_state=stand_ins["get_rng_state"], set_rng_state=stand_ins["set_rng_state"]
    )
    # Anything not stood in for is the real attribute, so an unexpected CUDA-only call
    # fails loudly instead of silently doing nothing.
    cuda.__getattr__ = lambda name: getattr(real_cuda, name)
    return cuda


_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "as_tensor",
    "linspace",
)


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, int):  # a CUDA ordinal
        return torch.device("cpu")
    return device


def _redirect_device(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


def _make_torch_proxy() -> types.ModuleType:
    proxy = types.ModuleType("torch (megatron cpu view)")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.cuda = _make_cuda_stand_in(torch.cuda)
    for name in _FACTORIES:
        setattr(proxy, name, _redirect_device(getattr(torch, name)))
    return proxy


_TORCH_PROXY: types.ModuleType | None = None


def _cuda_type_name(name: str) -> str:
    """``torch.FloatTensor`` -> ``torch.cuda.FloatTensor`` (what Megatron checks for)."""
    return name.replace("torch.", "torch.cuda.", 1) if name.count(".") == 1 else name


def install_cpu_stand_ins() -> None:
    """Give megatron.* modules CPU stand-ins for torch.cuda; idempotent; CPU only."""
    global _TORCH_PROXY
    if gpu_available():
        raise RuntimeError(
            "refusing to install CPU stand-ins for torch.cuda: a GPU is available, "
            "Megatron-Core must use the real CUDA runtime"
        )
    if _TORCH_PROXY is not None:
        return
    proxy = _make_torch_proxy()
    torch_compat.cuda_tensor_views_for_megatron(_cuda_type_name)
    megatron_core.give_megatron_torch(proxy)
    _TORCH_PROXY = proxy
