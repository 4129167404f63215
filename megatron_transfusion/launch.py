"""``python -m megatron_transfusion.launch``: torchrun, ending the way a user expects.

It is torchrun (``torch.distributed.run``'s own entry; its options and the command after
them unchanged) and differs only in how a run ends:

- workers that stopped on a user mistake (exit 2, after one ``error:`` line) end it with
  exit 2 and nothing more, instead of torchrun's ChildFailedError traceback; a line that
  several workers print alike is printed once (``MTF_LAUNCH_ERRORS``, read by ``console.run_cli``);
- workers that saved a checkpoint on request and stopped (exit 3) end it with exit 3;
- a stop signal that torchrun itself gets (Ctrl-C in a terminal, SIGTERM, Slurm's USR1 where
  ``--signals-to-handle`` names it) is forwarded once to every worker, which finishes its
  step, saves and exits; torchrun waits up to ``--shutdown-timeout`` seconds (30 by default)
  before it kills them. That ends with one ``stopped by SIG...`` line and exit 128 + the
  signal's number, as a shell reports a process ended by that signal, instead of a
  SignalException traceback.

A crash keeps torchrun's report. torchrun's routine log lines about the endings above are
left out; its other lines (e.g. that it had to kill a worker) stay.

    python -m megatron_transfusion.launch --standalone --nproc-per-node 2 \\
        -m megatron_transfusion.train --config tiny
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile

from megatron_transfusion.config import EXIT_PREEMPTED, EXIT_USER_ERROR

ERRORS_ENV = "MTF_LAUNCH_ERRORS"  # a directory: one file per error line a worker has printed
_REPORTED = (EXIT_USER_ERROR, EXIT_PREEMPTED)  # the workers said why they stopped
_TORCHRUN_LOGGERS = (
    "torch.distributed.elastic.multiprocessing.api",
    "torch.distributed.elastic.agent.server.api",
)


class _QuietEndings(logging.Filter):
    """Leaves out torchrun's lines about signalling workers and about a worker that exited
    with a code whose reason it printed itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(("Sending process %s closing signal", "Received %s death signal")):
            return False
        return not (
            message.startswith("failed (exitcode:") and record.args and record.args[0] in _REPORTED
        )


def _reported_exit(failures) -> int | None:
    """2 or 3 where the failed workers exited with it (those torchrun then stopped with
    SIGTERM aside), else None: ``failures`` maps ranks to torchrun's ProcessFailures."""
    codes = {failure.exitcode for failure in failures.values()} - {-signal.SIGTERM}
    return codes.pop() if len(codes) == 1 and codes <= set(_REPORTED) else None


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    for name in _TORCHRUN_LOGGERS:
        logging.getLogger(name).addFilter(_QuietEndings())
    with tempfile.TemporaryDirectory(prefix="mtf-launch-") as errors:
        os.environ[ERRORS_ENV] = errors  # the workers inherit it
        try:
            torchrun(argv)
        except ChildFailedError as e:
            code = _reported_exit(e.failures)
            if code is None:
                raise
            raise SystemExit(code) from None
        except SignalException as e:
            print(
                f"stopped by {e.sigval.name} (torchrun passed it on to the workers)",
                file=sys.stderr,
            )
            raise SystemExit(128 + e.sigval) from None
        except KeyboardInterrupt:  # before torchrun handles signals itself (rendezvous)
            print("interrupted", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()
