"""Patches on DeepSpeed's private internals (written for the pinned DeepSpeed 0.19.8)."""

from __future__ import annotations

from megatron_transfusion.compat import patcher

WRITTEN_FOR = "0.19.8"
patch = patcher("deepspeed", WRITTEN_FOR, __name__)


@patch
def relink_optimizer_state(zero_optimizer) -> None:
    """Link every parameter to its fragments of the optimizer state again (ZeRO-1/2).

    ZeRO-1/2 link them once, after the first param group's update, which leaves the second
    group's parameters linked to nothing, so DeepSpeed's per-parameter state accessors
    (``safe_get_full_optimizer_state``) miss them. ZeRO-3 reads the state directly: nothing
    to do there."""
    if hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
