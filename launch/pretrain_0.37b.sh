#!/usr/bin/env bash
# Transfusion 0.37B as in the paper (4096-token sequences, 2M-token batches) on nodes with
# 8 GPUs; the same launcher as launch/pretrain_7b.sh (read it for usage and the layout).
#   sbatch launch/pretrain_0.37b.sh 'data.sources=[{kind: text, path: ...}, {kind: image_caption, path: ...}]'
#   bash launch/pretrain_0.37b.sh --dry-run
#SBATCH --job-name=mtf-0.37b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# shellcheck source=launch/slurm_common.sh
source "${MTF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launch/slurm_common.sh"
mtf_pretrain transfusion-0.37b "$@"
