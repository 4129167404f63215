"""Every patch on a dependency's internals is in ``compat``, listed, and refuses to run on a
version other than the one it was written for (the one setup.py pins)."""

import re
from pathlib import Path

import pytest

from megatron_transfusion import compat
from megatron_transfusion.compat import deepspeed as deepspeed_compat
from megatron_transfusion.compat import megatron_core
from megatron_transfusion.compat import torch as torch_compat
from megatron_transfusion.config import UserError

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"megatron-core": megatron_core, "deepspeed": deepspeed_compat, "torch": torch_compat}

# The inventory: adding or removing a patch means changing this list on purpose.
INVENTORY = {
    "megatron_core.give_megatron_torch",
    "megatron_core.in_process_checkpoint_writer",
    "megatron_core.torch_dist_loading_through",
    "megatron_core.load_distributed_optimizer_state",
    "torch.cuda_tensor_views_for_megatron",
    "deepspeed.relink_optimizer_state",
}


def test_every_patch_is_listed_with_its_reason():
    assert {patch.name for patch in compat.PATCHES} == INVENTORY
    for patch in compat.PATCHES:
        assert patch.why and patch.written_for == MODULES[patch.distribution].WRITTEN_FOR, patch


def test_each_compat_module_is_written_for_the_version_setup_py_pins():
    pins = dict(re.findall(r'"([a-z-]+)==([0-9.]+)"', (ROOT / "setup.py").read_text()))
    for distribution, module in MODULES.items():
        assert pins[distribution] == module.WRITTEN_FOR, distribution
        assert compat.installed_version(distribution) == module.WRITTEN_FOR  # this environment


def test_no_production_code_patches_with_mock():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("megatron_transfusion", "kernels", "data_prep", "checkpoints")
        for path in (ROOT / folder).rglob("*.py")
        if "unittest" in path.read_text()
    ]
    assert offenders == []


@pytest.mark.parametrize("distribution", sorted(MODULES))
def test_a_patch_refuses_another_version_in_one_line(monkeypatch, distribution):
    module = MODULES[distribution]
    monkeypatch.setattr(
        compat, "installed_version", lambda name: "9.9.9" if name == distribution else ""
    )
    patch = next(p for p in compat.PATCHES if p.distribution == distribution)
    with pytest.raises(UserError) as info:
        getattr(module, patch.name.split(".")[1])()  # refused before its arguments are looked at
    (line,) = str(info.value).splitlines()
    assert line == (
        f"{module.__name__} patches the internals of {distribution} {module.WRITTEN_FOR}, but "
        f"{distribution} 9.9.9 is installed: "
        f"install {distribution}=={module.WRITTEN_FOR} (pinned in setup.py)"
    )


def test_replaced_restores_the_attribute_even_after_an_error():
    class Owner:
        value = 1

    with pytest.raises(RuntimeError), compat.replaced(Owner, "value", 2):
        assert Owner.value == 2
        raise RuntimeError
    assert Owner.value == 1
