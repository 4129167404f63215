#!/usr/bin/env bash
# The offline sharding job (mtf-prepare-data) on Slurm: a job array of PARTS tasks, then a
# merge job that runs only once every task has succeeded. Run it (not sbatch) anywhere:
#   bash launch/shard_dataset.sh PARTS SHARD-OPTIONS...
#   bash launch/shard_dataset.sh 64 --kind image_caption --inputs data/laion/ --out shards/img \
#       --tokenizer tokenizer.json --vae my_vae/ --image-size 256
# Task i of the array takes input units i, i+PARTS, ... (mtf-prepare-data reads its index
# from SLURM_ARRAY_TASK_ID); any split gives the same dataset. If a task fails, the merge is
# cancelled: submit the same command again, finished units are skipped. Relative paths are
# relative to this directory; sbatch options come from the usual environment variables
# (SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_GPUS_PER_NODE for the VAE, ...).
# Prints the two job ids: ARRAY_ID MERGE_ID.
set -euo pipefail
# shellcheck source=launch/slurm_common.sh
source "${MTF_ROOT:-$(dirname "$0")/..}/launch/slurm_common.sh"

(($# >= 2)) && [[ $1 =~ ^[1-9][0-9]*$ ]] || mtf_die "usage: $0 PARTS SHARD-OPTIONS... (with --out DIR)"
parts=$1
shift
out=
for ((i = 1; i <= $#; i++)); do
    case ${!i} in
        --out) j=$((i + 1)); out=${!j:-} ;;
        --out=*) out=${!i#--out=} ;;
    esac
done
[[ -n $out ]] || mtf_die "the shard options need --out DIR"

shard=$(printf '%q ' "$MTF_PYTHON" -m data_prep.shard shard "$@")
merge=$(printf '%q ' "$MTF_PYTHON" -m data_prep.shard merge --out "$out")
array_id=$(sbatch --parsable --job-name=mtf-shard --array="0-$((parts - 1))" --wrap="$shard")
merge_id=$(sbatch --parsable --job-name=mtf-merge --dependency="afterok:$array_id" \
    --kill-on-invalid-dep=yes --wrap="$merge")
echo "$array_id $merge_id"
