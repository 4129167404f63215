"""Loading a model, in any TP/PP layout, from whole (unsharded) tensors.

Whole tensors are named as a TP=1/PP=1 model's ``state_dict`` names them
(``decoder.layers.3.mlp.linear_fc1.weight``): the names of an exported file, and what the
Hugging Face conversion produces. Each rank takes its shard of each tensor from the
model's own sharded state dict (``ShardedTensor.global_slice``), the description
Megatron's resharding loader works from, so no TP/PP rule is restated here. Sources are
read lazily, one tensor at a time: a rank reads only the layers of its pipeline stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from megatron_transfusion.config import UserError

LAYERS = "decoder.layers."

# A whole tensor by its TP=1/PP=1 name; None where the source does not have it.
WholeTensors = Callable[[str], "torch.Tensor | None"]


def whole_name(shard: ShardedTensor) -> str:
    """The TP=1/PP=1 state_dict name of the tensor ``shard`` is a piece of: layers are one
    stacked tensor in the sharded state dict, their index its first, prepended axis."""
    if shard.prepend_axis_num == 0:
        return shard.key
    if shard.prepend_axis_num != 1 or not shard.key.startswith(LAYERS):
        raise ValueError(f"unexpected stacked tensor {shard.key!r} in the model's state dict")
    return f"{LAYERS}{shard.global_offset[0]}.{shard.key.removeprefix(LAYERS)}"


def model_shards(chunks) -> list[ShardedTensor]:
    """Every tensor shard of this rank's model chunks; the data of each is a view of a
    parameter (or of a half of one: SwiGLU's fc1 is stored as its gate and up halves)."""
    shards = []
    for chunk in chunks:
        state = chunk.sharded_state_dict()
        apply_factories(state)
        for entry in state.values():
            for shard in entry if isinstance(entry, list) else [entry]:
                if isinstance(shard, ShardedTensor):
                    shards.append(shard)
    return shards


def whole_shape(shard: ShardedTensor) -> tuple[int, ...]:
    return tuple(shard.global_shape[shard.prepend_axis_num :])


@torch.no_grad()
def load_whole(chunks, tensors: WholeTensors, source: str) -> list[str]:
    """Fill this rank's model chunks from ``tensors``; returns the names the source does not
    have (left as initialised). A tensor of another shape is a UserError naming both."""
    missing = []
    for shard in model_shards(chunks):
        name = whole_name(shard)
        whole = tensors(name)
        if whole is None:
            missing.append(name)
            continue
        if tuple(whole.shape) != whole_shape(shard):
            raise UserError(
                f"{source}: tensor '{name}' has shape {tuple(whole.shape)}, the model's is "
                f"{whole_shape(shard)}: the checkpoint is of another model size"
            )
        shard.data.copy_(whole[shard.global_slice()[shard.prepend_axis_num :]])
    return sorted(set(missing))


def summarize(names: Iterable[str]) -> str:
    """'patch_in (7 tensors), decoder.layers.* (9 tensors)': what a partial load left fresh."""
    groups: dict[str, int] = {}
    for name in names:
        group = f"{LAYERS}*" if name.startswith(LAYERS) else name.split(".")[0]
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{g} ({n} tensor{'s' * (n > 1)})" for g, n in sorted(groups.items()))
