"""``mtf-checkpoint inspect|export``: look into a checkpoint; consolidate its model.

Checkpoints are Megatron dist-checkpoints in one layout for every engine, so resharding
needs no tool: a run resumed with another TP/PP/DP layout or engine loads the same
directory (``--resume PATH``). ``export``
writes the model alone, unsharded, as one safetensors file plus the run's config, which
inference and other frameworks can read without Megatron's loader. Both check the
checkpoint's files against its manifest first, and an exported file against the SHA-256
it holds (``--no-verify`` skips that); ``inspect`` also reads an exported file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from megatron_transfusion.checkpointing import read_metadata, run_config_path, verify_checkpoint
from megatron_transfusion.console import run_cli
from megatron_transfusion.config import UserError, load_config
from megatron_transfusion.inference.load import export_metadata, find_checkpoint


def inspect(path: Path, verify: bool = True) -> dict:
    """Step, counters and tensor shapes of a checkpoint (any path mtf-generate takes)."""
    checkpoint = find_checkpoint(path)
    if checkpoint.suffix == ".safetensors":
        from safetensors import safe_open

        step = export_metadata(checkpoint, verify).get("step", "")  # refuses a truncated or damaged file
        with safe_open(str(checkpoint), "pt") as f:
            tensors = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
        return {"trainer": {"step": int(step) if step.isdigit() else step, "exported": True}, "ranks": 1,
                "tensors": tensors}  # fmt: skip
    if verify:
        verify_checkpoint(checkpoint)
    metadata = read_metadata(checkpoint / "engine")
    tensors = {
        key: list(item.size)
        for key, item in metadata.state_dict_metadata.items()
        if hasattr(item, "size")
    }
    return {
        "trainer": json.loads((checkpoint / "trainer.json").read_text()),
        "ranks": len(list((checkpoint / "rng").glob("rank_*.safetensors"))),
        "tensors": tensors,
    }


def export(path: Path, out: Path, verify: bool = True) -> Path:
    """Load the model at TP=1/PP=1 in this process and save it as one safetensors file
    (with its SHA-256 inside, checked wherever it is loaded)."""
    from megatron_transfusion import platform
    from megatron_transfusion.checkpointing import load_trained_model, save_export
    from megatron_transfusion.model import build_model
    from megatron_transfusion.parallel import destroy_distributed, init_distributed

    checkpoint = find_checkpoint(path)
    if checkpoint.suffix == ".safetensors":
        raise UserError(f"'{checkpoint}' is already an exported file")
    if verify:
        verify_checkpoint(checkpoint)
    config_path = run_config_path(checkpoint)
    cfg = load_config(str(config_path), ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                                         "parallel.virtual_pipeline=null"])  # fmt: skip
    plat = platform.activate()
    init_distributed(cfg.parallel, plat)
    try:
        (model,) = build_model(cfg, plat)
        load_trained_model([model], checkpoint)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if hasattr(v, "contiguous")}
        out.parent.mkdir(parents=True, exist_ok=True)
        step = json.loads((checkpoint / "trainer.json").read_text())["step"]
        save_export(tensors, out, {"step": str(step), "config": yaml.safe_dump(cfg.to_dict())})
    finally:
        destroy_distributed()
    return out


@run_cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mtf-checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_cmd = commands.add_parser("inspect", help="step, counters, data state, tensor shapes")
    export_cmd = commands.add_parser("export", help="one consolidated safetensors file of the model")
    export_cmd.add_argument("--out", type=Path, required=True)
    for command in (inspect_cmd, export_cmd):
        command.add_argument("checkpoint", type=Path, help="run dir, checkpoints dir, step_N dir (inspect: "
                                                           "or an exported .safetensors)")  # fmt: skip
        command.add_argument("--no-verify", action="store_true",
                             help="skip checking the checkpoint's files against its manifest "
                                  "(an exported file: against its SHA-256)")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        report = inspect(args.checkpoint, verify=not args.no_verify)
        trainer = report.pop("trainer")
        print(json.dumps({"step": trainer.pop("step"), "ranks": report["ranks"], **trainer}, indent=1))
        for key, shape in sorted(report["tensors"].items()):
            print(f"{key:80s} {shape}")
    else:
        print(f"wrote {export(args.checkpoint, args.out, verify=not args.no_verify)}")


if __name__ == "__main__":
    main()
