"""The layers' elementwise work as pure functions, run as written or compiled.

``model.fuse_elementwise`` runs them through torch.compile (inductor: C++ on CPU, Triton
on GPU) in training: each becomes one pass over the activations in forward and one in
backward, where eager torch makes one pass per op and keeps more intermediates for
backward. The arithmetic is the same, so results agree to fp32 rounding
(tests/test_fused.py). Pure functions of tensors, not Megatron's modules, are compiled:
those hold custom autograd Functions and process groups that would break the graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # One graph per function, shared by every layer. Dynamo's default (static shapes,
    # then one dynamic graph after a shape changes) compiles once for training's fixed
    # shape. Not fullgraph: past the recompile limit, eager is slower but still right.
    return torch.compile(fn)


def fusable(fn: Callable, fused: bool) -> Callable:
    """``fn``, compiled when ``fused`` for calls that record autograd (training steps).
    Inference calls run ``fn`` eagerly: generation changes shapes every few calls (KV
    cache, 1 to n queries), and each new shape would compile again."""
    if not fused:
        return fn
    compiled = _compiled(fn)

    @functools.wraps(fn)
    def run(*args):
        return (compiled if torch.is_grad_enabled() else fn)(*args)

    return run


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)
