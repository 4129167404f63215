"""The platform layer: CPU stand-ins scoped to Megatron-Core, refused when CUDA exists."""

import subprocess
import sys

import pytest
import torch

from megatron_transfusion import platform

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")


def test_cpu_platform_choices():
    plat = platform.current()
    assert (plat.name, plat.dist_backend, plat.dtype, plat.attention_backend) == (
        "cpu", "gloo", torch.float32, "sdpa")  # fmt: skip
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
        "    assert not platform.cpu_stand_ins_installed()\n"
        "    print('refused')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "refused", result.stderr


def test_only_the_platform_module_mentions_torch_cuda():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = [
        str(path.relative_to(root))
        for folder in ("megatron_transfusion", "kernels", "data_prep", "checkpoints", "launch")
        for path in (root / folder).rglob("*.py")
        if "torch.cuda" in path.read_text() and path.name != "platform.py"
    ]
    assert offenders == []
