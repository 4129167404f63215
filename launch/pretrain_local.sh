#!/usr/bin/env bash
# Pretrain on this machine (CPU or local GPUs) with torchrun, then sample from the last
# checkpoint. Prepares the built-in data if it is missing. Arguments are config overrides:
#   NPROC=2 bash launch/pretrain_local.sh parallel.tensor_parallel=2 run.train_steps=50
#   RESUME=none bash launch/pretrain_local.sh      # start over instead of resuming
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
NPROC=${NPROC:-1}
CONFIG=${CONFIG:-tiny}
RESUME=${RESUME:-auto}
# One intra-op thread per process (torchrun's own default when NPROC > 1): when another job
# shares the cores, two threads stall each other. Measured on 2 cores beside one other
# training job, the tiny preset: 400 tokens/s with two threads, 7.6k with one.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Captions from the built-in data (shapes scenes seen in training, two emoji names): the samples
# should show what they say. Shapes captions are scored after sampling (data_prep.shapes).
PROMPTS=${PROMPTS:-"a large red circle on the left;a small blue square on the right;\
a large yellow triangle in the center;a small green circle on the left;\
a green square to the left of a blue triangle;a yellow circle to the left of a red square;\
red heart;grinning face"}

"$VENV/bin/mtf-prepare-builtin" --out data/builtin
# torchrun through the project's launcher: a user mistake ends in one error line and exit 2,
# Ctrl-C in one line after the checkpoint (megatron_transfusion/launch.py).
"$VENV/bin/python" -m megatron_transfusion.launch --standalone --nproc_per_node "$NPROC" \
    -m megatron_transfusion.train --config "$CONFIG" --resume "$RESUME" "$@"

# The run directory and where the last checkpoint's samples go (mtf-generate's default).
read -r run_dir samples < <("$VENV/bin/python" - "$CONFIG" "$@" <<'PY'
import sys
from pathlib import Path
from checkpoints import layout
from megatron_transfusion.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
run_dir = Path(cfg.run.output_root) / cfg.run.name
latest = layout.latest_file(Path(cfg.checkpoint.directory or layout.checkpoints_dir(run_dir)))
print(run_dir, run_dir / "samples" / latest.read_text().strip())
PY
)
prompt_args=()
IFS=';' read -ra prompts <<< "$PROMPTS"
for prompt in "${prompts[@]}"; do prompt_args+=(--prompt "$prompt"); done
"$VENV/bin/mtf-generate" "$run_dir" "${prompt_args[@]}" --steps 100 --guidance 3 --out "$samples"
"$VENV/bin/python" -m data_prep.shapes score "$samples"
