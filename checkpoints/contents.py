"""What a checkpoint or an exported file holds: step, counters, ranks and tensor shapes."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from checkpoints import layout
from checkpoints.export import read_export_metadata
from checkpoints.huggingface import read_json
from checkpoints.publish import verify_checkpoint
from checkpoints.sharded import read_metadata


def inspect(path: Path, verify: bool = True) -> dict:
    """Step, counters and tensor shapes of a checkpoint (any path mtf-generate takes)."""
    checkpoint = layout.find_checkpoint(path)
    if checkpoint.suffix == ".safetensors":
        step = read_export_metadata(checkpoint, verify).get(
            "step", ""
        )  # refuses a truncated or damaged file
        with safe_open(str(checkpoint), "pt") as f:
            # safe_open handles have keys() but are not iterable, so no `key in f`.
            tensors = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
        return {
            "trainer": {"step": int(step) if step.isdigit() else step, "exported": True},
            "ranks": 1,
            "tensors": tensors,
        }
    if layout.is_hf_export(checkpoint):
        if verify:
            verify_checkpoint(checkpoint)
        side = read_json(checkpoint / layout.HF_TRANSFUSION)
        return {
            "trainer": {"step": side.get("step"), "exported": "hf"},
            "ranks": 1,
            "tensors": {
                key: list(f.get_slice(key).get_shape())
                for path in sorted(checkpoint.glob("*.safetensors"))
                for f in [safe_open(str(path), "pt")]
                for key in f.keys()  # noqa: SIM118 (safe_open handles are not iterable)
            },
        }
    if verify:
        verify_checkpoint(checkpoint)
    metadata = read_metadata(layout.engine_dir(checkpoint))
    tensors = {
        key: list(item.size)
        for key, item in metadata.state_dict_metadata.items()
        if hasattr(item, "size")
    }
    return {
        "trainer": layout.read_trainer_state(checkpoint),
        "ranks": layout.saved_ranks(checkpoint),
        "tensors": tensors,
    }
