#!/usr/bin/env bash
# Pretrain on this machine (CPU or local GPUs) with torchrun; prepares the built-in data if
# it is missing. Extra arguments are config overrides, e.g. run.train_steps=50.
#   NPROC=2 bash launch/pretrain_local.sh parallel.tensor_parallel=2
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
NPROC=${NPROC:-1}
CONFIG=${CONFIG:-tiny}
RESUME=${RESUME:-auto}

"$VENV/bin/mtf-prepare-builtin" --out data/builtin
exec "$VENV/bin/python" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m megatron_transfusion.train --config "$CONFIG" --resume "$RESUME" "$@"
