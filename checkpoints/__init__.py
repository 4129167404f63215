"""Everything a checkpoint is: where its files live (``layout``), the sharded model and
optimizer state inside it (``sharded``), its manifest and atomic publication
(``publish``), what a training run saves and resumes from (``train_state``), the
consolidated export (``export``), what one holds (``contents``), and the
``mtf-checkpoint`` tool (``cli``)."""

from megatron_transfusion.config import UserError


class CheckpointError(UserError):
    """A checkpoint file is missing, damaged, or holds something other than checkpoint data."""


# What to do about a damaged checkpoint, in the errors that report one: loading without
# verification, and loading with it (where --no-verify is the way around).
DAMAGED_UNVERIFIED = "restore it or use an earlier checkpoint"
DAMAGED = f"{DAMAGED_UNVERIFIED}, or pass --no-verify to load it anyway"
