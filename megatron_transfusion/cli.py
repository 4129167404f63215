"""Console entry points. User mistakes print one ``error:`` line and exit 2."""

from __future__ import annotations

import argparse
import sys
import typing

import yaml

from megatron_transfusion.config import ExperimentConfig, load_config
from megatron_transfusion.console import human_size, run_cli


def _config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=8")
    return parser


@run_cli
def config_main(argv=None) -> None:
    """Print the resolved config and its parameter counts."""
    args = _config_parser("Resolve and validate a config.").parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from megatron_transfusion.model.params import count_parameters

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    c = count_parameters(cfg.model)
    print(
        f"# parameters: language model {human_size(c.language_model)} "
        f"(embedding {human_size(c.embedding)}, "
        f"transformer {human_size(c.transformer)}, head {human_size(c.lm_head)}) + "
        f"{cfg.model.patch_layer} patch layers {human_size(c.patch_layers)} = {human_size(c.total)}"
    )


@run_cli
def overfit_main(argv=None) -> None:
    """Overfit one fixed mixed batch and check both losses fell by more than 90%."""
    parser = _config_parser("Overfit the model on one fixed text+image batch.")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from megatron_transfusion.loss import LossTerms
    from megatron_transfusion.smoke import overfit

    def log(step, report):
        if step % 10 == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss {report.total:.4f}  lm {report.lm:.4f}  "
                f"diffusion {report.diffusion:.4f}",
                flush=True,
            )

    history = overfit(cfg, args.steps, args.lr, log)
    first, last = history[0].as_dict(), history[-1].as_dict()
    fell = {k: 1 - last[k] / first[k] for k in LossTerms.KEYS[1:]}  # lm_loss, diffusion_loss
    print("fall: " + ", ".join(f"{k} {v:.1%}" for k, v in fell.items()))
    if min(fell.values()) <= 0.9:
        raise SystemExit("overfit failed: a loss fell by 90% or less")


def _sections() -> str:
    """The config's sections with what each holds (the first line of its docstring)."""
    lines = ["config sections (override any field as section.field=value):"]
    for name, section in typing.get_type_hints(ExperimentConfig).items():
        lines.append(f"  {name:<12} {section.__doc__.splitlines()[0].replace('``', '')}")
    lines.append("every field with its value: mtf-config --config PRESET [overrides]")
    return "\n".join(lines)


@run_cli
def train_main(argv=None) -> None:
    """Pretrain; under torchrun/srun every rank runs this."""
    parser = _config_parser("Pretrain a Transfusion model.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _sections()
    parser.add_argument(
        "--resume",
        default=None,
        help="auto (latest checkpoint of the run, if any), none, or a checkpoint path "
        "(default: checkpoint.load if set, else auto)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="resume (or start from checkpoint.init_from) without checking the checkpoint's "
        "files against its manifest",
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from megatron_transfusion.training.trainer import TrainingError, train

    try:
        train(cfg, args.resume, verify=not args.no_verify)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
