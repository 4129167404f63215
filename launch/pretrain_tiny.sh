#!/usr/bin/env bash
# The tiny preset on CPUs under Slurm: two tasks (one process each) joined by the same c10d
# rendezvous as the multi-node GPU scripts. For the local cluster (launch/local_slurm.sh)
# and any CPU partition. Prepare the built-in data first (mtf-prepare-builtin --out data/builtin),
# then from the repository root:
#   sbatch launch/pretrain_tiny.sh [config overrides, e.g. run.train_steps=50]
#SBATCH --job-name=mtf-tiny
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

MTF_CLUSTER=${MTF_CLUSTER:-cpu} # what a dry run's layout prediction assumes
# shellcheck source=launch/slurm_common.sh
source "${MTF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launch/slurm_common.sh"
mtf_pretrain tiny "$@"
