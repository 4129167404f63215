"""``mtf-checkpoint inspect|export|import-hf``: look into a checkpoint; export its model;
import a Hugging Face Llama.

Checkpoints are Megatron dist-checkpoints in one layout for every engine, so resharding
needs no tool: a run resumed with another TP/PP/DP layout or engine loads the same
directory (``--resume PATH``). ``export`` writes the model alone, unsharded: as one
safetensors file with the run's config (``--format safetensors``), or as a Hugging Face
directory ``transformers`` loads as a ``LlamaForCausalLM``, with the patch layers and the
run's config beside it (``--format hf``). Both check the checkpoint's files against its
manifest first, and an exported file against the SHA-256 it holds (``--no-verify`` skips
that); ``inspect`` also reads an exported file. ``import-hf`` writes a run directory whose
checkpoint is a Hugging Face Llama's weights, for ``checkpoint.init_from``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from checkpoints.contents import inspect
from checkpoints.export import export_checkpoint, export_hf
from checkpoints.import_hf import import_hf
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
    export_cmd.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="one .safetensors file (default), or a Hugging Face Llama directory",
    )
    export_cmd.add_argument(
        "--max-shard-gib",
        type=float,
        default=5.0,
        help="--format hf: largest weight file, GiB (default 5, as save_pretrained)",
    )
    import_cmd = commands.add_parser(
        "import-hf", help="a Hugging Face Llama directory as a weights-only checkpoint"
    )
    import_cmd.add_argument("directory", type=Path, help="config.json + model*.safetensors")
    import_cmd.add_argument("--out", type=Path, required=True, help="run directory to write")
    import_cmd.add_argument(
        "--config",
        default="tiny",
        help="preset or YAML for everything but the model section, which config.json gives",
    )
    import_cmd.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. data.seq_length=4096"
    )
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
    # import-hf's overrides may follow --out: argparse settles the positionals when it meets
    # DIR (overrides then empty) and hands back what comes after the options unparsed.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-")] if args.command == "import-hf" else extra
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra
    if args.command == "inspect":
        report = inspect(args.checkpoint, verify=not args.no_verify)
        trainer = report.pop("trainer")
        print(
            json.dumps({"step": trainer.pop("step"), "ranks": report["ranks"], **trainer}, indent=1)
        )
        for key, shape in sorted(report["tensors"].items()):
            print(f"{key:80s} {shape}")
    elif args.command == "import-hf":
        checkpoint, fresh = import_hf(args.directory, args.out, args.config, args.overrides)
        print(f"wrote {checkpoint}" + (f" (initialised fresh: {fresh})" if fresh else ""))
        print(f"train from it: mtf-train --config {args.out / 'config.yaml'} [overrides]")
    elif args.format == "hf":
        max_bytes = int(args.max_shard_gib * 2**30)
        print(f"wrote {export_hf(args.checkpoint, args.out, not args.no_verify, max_bytes)}")
    else:
        print(f"wrote {export_checkpoint(args.checkpoint, args.out, verify=not args.no_verify)}")


if __name__ == "__main__":
    main()
