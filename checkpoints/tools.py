"""``mtf-checkpoint inspect|export``: look into a checkpoint; consolidate its model.

Checkpoints are Megatron dist-checkpoints in one layout for every engine, so resharding
needs no tool: a run resumed with another TP/PP/DP layout or engine loads the same
directory (``--resume PATH``). ``export``
writes the model alone, unsharded, as one safetensors file plus the run's config, which
inference and other frameworks can read without Megatron's loader.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from megatron_transfusion.checkpointing import run_config_path
from megatron_transfusion.config import ConfigError, load_config


def inspect(checkpoint: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    if not (checkpoint / "trainer.json").exists():
        raise FileNotFoundError(f"'{checkpoint}' is not a complete checkpoint (no trainer.json)")
    metadata = FileSystemReader(str(checkpoint / "engine")).read_metadata()
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


def export(checkpoint: Path, out: Path) -> Path:
    """Load the model at TP=1/PP=1 in this process and save it as one safetensors file."""
    from safetensors.torch import save_file

    from megatron_transfusion import platform
    from megatron_transfusion.checkpointing import load_trained_model
    from megatron_transfusion.model import build_model
    from megatron_transfusion.parallel import destroy_distributed, init_distributed

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
        save_file(tensors, out, metadata={"step": str(step), "config": yaml.safe_dump(cfg.to_dict())})
    finally:
        destroy_distributed()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mtf-checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_cmd = commands.add_parser("inspect", help="step, counters, data state, tensor shapes")
    inspect_cmd.add_argument("checkpoint", type=Path)
    export_cmd = commands.add_parser("export", help="one consolidated safetensors file of the model")
    export_cmd.add_argument("checkpoint", type=Path)
    export_cmd.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            report = inspect(args.checkpoint)
            trainer = report.pop("trainer")
            print(json.dumps({"step": trainer.pop("step"), "ranks": report["ranks"], **trainer}, indent=1))
            for key, shape in sorted(report["tensors"].items()):
                print(f"{key:80s} {shape}")
        else:
            print(f"wrote {export(args.checkpoint, args.out)}")
    except (FileNotFoundError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
