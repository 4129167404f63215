"""Patches on torch itself (written for the pinned torch 2.14.1)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

from megatron_transfusion.compat import patcher

WRITTEN_FOR = "2.14.1"
patch = patcher("torch", WRITTEN_FOR, __name__)


def _called_from_megatron(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith("megatron.")


@patch
def cuda_tensor_views_for_megatron(device_type_name: Callable[[str], str]) -> None:
    """On CPU, Megatron's callers see CUDA tensor type names and a ``t.cuda()`` that stays put.

    ``t.type()`` answers them with ``device_type_name`` of torch's answer (the platform's CUDA
    type name, which Megatron's optimizers check for), and ``t.cuda()`` (used when gathering
    optimizer state) leaves the tensor on the CPU. Tensor methods cannot be given per module,
    so ``torch.Tensor``'s own are replaced by views that look at their caller; every other
    caller gets torch's answer."""
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    @functools.wraps(original_type)
    def type_view(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if args or kwargs or not _called_from_megatron():
            return name
        return device_type_name(name)

    @functools.wraps(original_cuda)
    def cuda_view(self, *args, **kwargs):
        return self if _called_from_megatron() else original_cuda(self, *args, **kwargs)

    torch.Tensor.type, torch.Tensor.cuda = type_view, cuda_view
