"""How every console command ends: a user mistake is one ``error:`` line and exit 2.

Below every entry point (``cli``, ``planning.cli``, ``inference.cli``, ``evaluation.cli``,
``checkpoints.cli``), so that none of them imports another to share it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys

from megatron_transfusion.config import EXIT_USER_ERROR, UserError


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
        os.close(
            os.open(
                os.path.join(directory, hashlib.sha256(line.encode()).hexdigest()),
                os.O_CREAT | os.O_EXCL | os.O_WRONLY,
            )
        )
    except FileExistsError:
        return False
    except OSError:  # no such directory (a launcher that has gone): say it
        pass
    return True


def human_size(n: int) -> str:
    """A parameter count as 1.234B or 56.78M."""
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
