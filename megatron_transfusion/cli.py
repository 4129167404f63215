"""Console entry points. User mistakes print one ``error:`` line and exit 2."""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys

import yaml

from megatron_transfusion.config import EXIT_USER_ERROR, UserError, load_config


def run_cli(main=None, *, also: tuple[type[Exception], ...] = ()):
    """Decorator; ``also`` adds exception types that mean bad user input for this command.
    Ctrl-C where a command does not handle it exits with 130, without a traceback."""
    if main is None:
        return functools.partial(run_cli, also=also)

    @functools.wraps(main)
    def wrapper(argv=None):
        from megatron_transfusion.data.source import CorruptShardError

        try:
            return main(argv)
        except (UserError, FileNotFoundError, CorruptShardError, *also) as e:
            if _first_to_say(f"error: {e}"):
                print(f"error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def _first_to_say(line: str) -> bool:
    """False where another worker of the same launch (``megatron_transfusion.launch``) has
    printed ``line`` already: the ranks of a run mostly make the same mistake, and one line
    says it."""
    from megatron_transfusion.launch import ERRORS_ENV

    directory = os.environ.get(ERRORS_ENV)
    if not directory:
        return True
    try:
        os.close(os.open(os.path.join(directory, hashlib.sha256(line.encode()).hexdigest()),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # fmt: skip
    except FileExistsError:
        return False
    except OSError:  # no such directory (a launcher that has gone): say it
        pass
    return True


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
    print(f"# parameters: language model {_size(c.language_model)} (embedding {_size(c.embedding)}, "
          f"transformer {_size(c.transformer)}, head {_size(c.lm_head)}) + "
          f"{cfg.model.patch_layer} patch layers {_size(c.patch_layers)} = {_size(c.total)}")  # fmt: skip


def _size(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


@run_cli
def overfit_main(argv=None) -> None:
    """Overfit one fixed mixed batch and check both losses fell by more than 90%."""
    parser = _config_parser("Overfit the model on one fixed text+image batch.")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from megatron_transfusion.smoke import overfit

    def log(step, report):
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {report['loss']:.4f}  lm {report['lm_loss']:.4f}  "
                  f"diffusion {report['diffusion_loss']:.4f}", flush=True)  # fmt: skip

    history = overfit(cfg, args.steps, args.lr, log)
    first, last = history[0], history[-1]
    fell = {k: 1 - last[k] / first[k] for k in ("lm_loss", "diffusion_loss")}
    print("fall: " + ", ".join(f"{k} {v:.1%}" for k, v in fell.items()))
    if min(fell.values()) <= 0.9:
        raise SystemExit("overfit failed: a loss fell by 90% or less")


@run_cli
def train_main(argv=None) -> None:
    """Pretrain; under torchrun/srun every rank runs this."""
    parser = _config_parser("Pretrain a Transfusion model.")
    parser.add_argument("--resume", default="auto",
                        help="auto (latest checkpoint of the run, if any), none, or a checkpoint path")
    parser.add_argument("--no-verify", action="store_true",
                        help="resume without checking the checkpoint's files against its manifest")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from megatron_transfusion.training.trainer import TrainingError, train

    try:
        train(cfg, args.resume, verify=not args.no_verify)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
