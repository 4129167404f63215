"""The platform layer: CPU stand-ins scoped to Megatron-Core, refused when CUDA exists."""

import subprocess
import sys
import types

import pytest
import torch

from megatron_transfusion import platform

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")


def test_cpu_platform_choices():
    plat = platform.current()
    assert (plat.name, plat.dist_backend, plat.dtype, plat.attention_backend) == (
        "cpu",
        "gloo",
        torch.float32,
        "sdpa",
    )
    assert plat.device() == torch.device("cpu")


def test_stand_ins_are_scoped_to_megatron_modules():
    platform.install_cpu_stand_ins()
    import megatron.core.tensor_parallel.layers as layers
    import megatron.core.transformer.utils as transformer_utils  # imported after: via the hook

    for module in (layers, transformer_utils):
        assert module.torch.cuda.current_device() == torch.device("cpu")
        assert module.torch.zeros(2, device="cuda").device.type == "cpu"
    # torch itself is untouched: its CUDA calls still fail on this machine.
    assert torch.cuda.is_available() is False
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_megatron_sees_cuda_tensor_type_names_and_others_do_not():
    platform.install_cpu_stand_ins()
    namespace = {"__name__": "megatron.core.optimizer.fake", "torch": torch}
    exec("def kind(t):\n    return t.type()\ndef move(t):\n    return t.cuda()", namespace)
    assert namespace["kind"](torch.zeros(1)) == "torch.cuda.FloatTensor"
    assert namespace["move"](torch.zeros(1)).device.type == "cpu"
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1).cuda()
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64


def test_cpu_rng_stand_in_seeds_the_cpu_generator():
    platform.install_cpu_stand_ins()
    from megatron.core.tensor_parallel import random as mp_random

    mp_random.torch.cuda.manual_seed(42)
    a = torch.rand(3)
    mp_random.torch.cuda.manual_seed(42)
    assert torch.equal(a, torch.rand(3))


def test_refuses_to_patch_when_cuda_is_available():
    # A fresh interpreter, so the refusal is checked before anything was installed.
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from megatron_transfusion import platform\n"
        "assert platform.current().name == 'cuda' and platform.current().dtype == torch.bfloat16\n"
        "assert platform.current().attention_backend == 'flex'\n"
        "try:\n"
        "    platform.install_cpu_stand_ins()\n"
        "except RuntimeError as e:\n"
        "    assert 'refusing' in str(e)\n"
        "    assert platform._TORCH_PROXY is None\n"
        "    print('refused')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "refused", result.stderr


def test_only_the_platform_module_mentions_torch_cuda():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    allowed = {"megatron_transfusion/platform.py"}
    offenders = [
        str(path.relative_to(root))
        for folder in ("megatron_transfusion", "kernels", "data_prep", "checkpoints", "launch")
        for path in (root / folder).rglob("*.py")
        if "torch.cuda" in path.read_text() and str(path.relative_to(root)) not in allowed
    ]
    assert offenders == []


# What MFU and memory are measured against. The GPU is faked at the platform's boundary
# (the driver's device name, the allocator's peak); everything above it is the real code.
GPU = platform.Platform("cuda", "nccl", torch.bfloat16, "flex")


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
    ],
)
def test_gpu_peak_is_the_datasheet_dense_bf16_figure(monkeypatch, name, peak):
    monkeypatch.setattr(platform, "device_name", lambda: name)
    assert GPU.peak_flops() == peak


def test_each_rank_uses_the_gpu_activate_selected(monkeypatch):
    """Eight ranks on a node: rank 3's model, batches and evaluation go to cuda:3."""
    monkeypatch.setattr(platform, "current_gpu", lambda: 3)
    assert GPU.device() == torch.device("cuda", 3)


def test_unknown_gpu_asks_for_run_peak_flops(monkeypatch):
    from megatron_transfusion.config import ConfigError

    monkeypatch.setattr(platform, "device_name", lambda: "NVIDIA GeForce RTX 4090")
    expected = (
        r"^config field 'run.peak_flops': .*'NVIDIA GeForce RTX 4090' in torch.bfloat16; set it"
    )
    with pytest.raises(ConfigError, match=expected):
        GPU.peak_flops()


def test_gpu_memory_is_the_allocator_peak_and_cpu_memory_the_resident_peak(monkeypatch):
    monkeypatch.setattr(platform, "gpu_peak_allocated", lambda: 123 * 2**20)
    assert GPU.peak_memory() == 123 * 2**20
    code = (
        "import torch\nfrom megatron_transfusion import platform\n"
        "cpu = platform.current()\nbefore = cpu.peak_memory()\nx = torch.ones(64 * 2**20)\n"
        "print((cpu.peak_memory() - before) / 2**20)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    grown = float(result.stdout)
    assert 200 < grown < 300  # the 256 MiB tensor (the mark may have stood above the set)


def test_cpu_peak_is_the_fastest_gemm_not_the_average(monkeypatch):
    """A busy machine slows some GEMMs down: the measured peak must be the fastest one's
    rate (an average here once gave a tenth of the peak, and MFU 800%)."""
    clock, durations = [0.0], iter([9.0, 9.0, 2.0, 0.5, 4.0, 4.0])  # 2 warm-ups, then 4 timed

    def matmul(a, b):
        clock[0] += next(durations)
        return a

    monkeypatch.setattr(platform, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(platform, "torch", types.SimpleNamespace(randn=torch.randn, matmul=matmul))
    assert platform.measure_matmul_peak(seconds=10.0, size=8) == 2 * 8**3 / 0.5


def test_planner_prediction_for_the_running_layout():
    """What the trainer logs beside its measured memory: the planner's own figure."""
    from megatron_transfusion.config import load_config
    from megatron_transfusion.planning.cluster import CLUSTERS
    from megatron_transfusion.planning.layouts import Layout
    from megatron_transfusion.planning.ranking import predict, predicted_memory

    cfg = load_config("transfusion-0.16b")
    on_gpu = predict(cfg, CLUSTERS["h100-80gb"], Layout.of_config(cfg, 8)).memory.total
    assert predicted_memory(cfg, GPU, 8) == on_gpu
    assert predicted_memory(cfg, platform.current(), 8) > on_gpu  # fp32 and a dense mask on CPU


def test_profiles_record_kernels_and_allocator_history_only_on_a_gpu(monkeypatch, tmp_path):
    """The CPU/GPU boundary of profiling, without a GPU: which profiler activities each
    platform asks for, and that only CUDA records allocator history and dumps snapshots
    (torch.cuda.memory's two calls stand in)."""
    calls = []
    monkeypatch.setattr(
        torch.cuda.memory, "_record_memory_history", lambda **kw: calls.append(("record", kw))
    )
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda p: calls.append(("dump", p)))
    cpu = platform.Platform("cpu", "gloo", torch.float32, "sdpa")
    gpu = platform.Platform("cuda", "nccl", torch.bfloat16, "flex")
    activity = torch.profiler.ProfilerActivity
    assert cpu.profiler_activities() == [activity.CPU]
    assert gpu.profiler_activities() == [activity.CPU, activity.CUDA]
    assert cpu.record_memory_history() is False and calls == []
    assert gpu.record_memory_history() is True
    gpu.dump_memory_snapshot(tmp_path / "rank_0.pickle")
    assert calls == [
        ("record", {"max_entries": platform.MEMORY_HISTORY_ENTRIES}),
        ("dump", str(tmp_path / "rank_0.pickle")),
    ]
