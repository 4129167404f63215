"""Under torchrun: ``mtf-train`` with rank 1 asleep inside its second training step (in
``sleep_in_step``, before the step's first collective) for ``--sleep`` seconds, so that
rank 0 waits in a collective meanwhile: a hang, for the watchdog and the collective
timeout. The remaining arguments are mtf-train's."""

import sys
import time

import torch.distributed as dist

from megatron_transfusion.cli import train_main
from megatron_transfusion.training.megatron_engine import MegatronEngine

SECONDS = float(sys.argv[sys.argv.index("--sleep") + 1])
train_step = MegatronEngine.train_step
steps = 0


def sleep_in_step(seconds: float) -> None:
    time.sleep(seconds)


def late_train_step(self, micro_batches, lr):
    global steps
    steps += 1
    if steps == 2 and dist.get_rank() == 1:
        sleep_in_step(SECONDS)
    return train_step(self, micro_batches, lr)


if __name__ == "__main__":
    MegatronEngine.train_step = late_train_step
    at = sys.argv.index("--sleep")
    train_main(sys.argv[1:at] + sys.argv[at + 2 :])
