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
# Captions from the built-in emoji set: the samples should look like their emoji.
PROMPTS=${PROMPTS:-"red heart;grinning face;sun;green apple;fire;snowflake;frog;blue heart"}

"$VENV/bin/mtf-prepare-builtin" --out data/builtin
"$VENV/bin/python" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m megatron_transfusion.train --config "$CONFIG" --resume "$RESUME" "$@"

run_dir=$("$VENV/bin/python" - "$CONFIG" "$@" <<'PY'
import sys
from megatron_transfusion.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
print(f"{cfg.run.output_root}/{cfg.run.name}")
PY
)
prompt_args=()
IFS=';' read -ra prompts <<< "$PROMPTS"
for prompt in "${prompts[@]}"; do prompt_args+=(--prompt "$prompt"); done
"$VENV/bin/mtf-generate" "$run_dir" "${prompt_args[@]}" --steps 100 --guidance 3
