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

from checkpoints.contents import inspect
from checkpoints.export import export_checkpoint
from megatron_transfusion.console import run_cli


@run_cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mtf-checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_cmd = commands.add_parser("inspect", help="step, counters, data state, tensor shapes")
    export_cmd = commands.add_parser(
        "export", help="one consolidated safetensors file of the model"
    )
    export_cmd.add_argument("--out", type=Path, required=True)
    for command in (inspect_cmd, export_cmd):
        command.add_argument(
            "checkpoint",
            type=Path,
            help="run dir, checkpoints dir, step_N dir (inspect: or an exported .safetensors)",
        )
        command.add_argument(
            "--no-verify",
            action="store_true",
            help="skip checking the checkpoint's files against its manifest "
            "(an exported file: against its SHA-256)",
        )
    args = parser.parse_args(argv)
    if args.command == "inspect":
        report = inspect(args.checkpoint, verify=not args.no_verify)
        trainer = report.pop("trainer")
        print(
            json.dumps({"step": trainer.pop("step"), "ranks": report["ranks"], **trainer}, indent=1)
        )
        for key, shape in sorted(report["tensors"].items()):
            print(f"{key:80s} {shape}")
    else:
        print(f"wrote {export_checkpoint(args.checkpoint, args.out, verify=not args.no_verify)}")


if __name__ == "__main__":
    main()
