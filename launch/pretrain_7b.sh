#!/usr/bin/env bash
# Transfusion 7B as in the paper (4096-token sequences, 4M-token batches, 500k steps) on
# H100 80 GB nodes with 8 GPUs each. From the repository root:
#   sbatch launch/pretrain_7b.sh 'data.sources=[{kind: text, path: shards/text}, {kind: image_caption, path: shards/img}]'
#   sbatch --nodes=64 -p PARTITION -A ACCOUNT launch/pretrain_7b.sh ...   # the layout follows
#   bash launch/pretrain_7b.sh --dry-run      # print the layout and the srun/torchrun command
# Arguments are config overrides. The layout is the preset's (its parallel and micro-batch
# settings, chosen for H100 80 GB by the layout planner); data parallelism takes the rest.
# Budget it must meet: DeepSpeed ZeRO-3 divides the bf16 weights, fp32 gradients and fp32
# Adam state (18 B per parameter, 126 GB for 7.0B) by DP and gathers a few layers' weights at
# a time; the rest is the activations of 2 micro-sequences of 4096 tokens (~53 GiB);
# the dry run ends with the planner's prediction.
# Preemption and time limits: see launch/slurm_common.sh; the job requeues itself and resumes.
#SBATCH --job-name=mtf-7b
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# One task per node: its torchrun starts a worker per GPU. Whole nodes (--exclusive,
# --mem=0): the data loaders use the CPUs. USR1 10 min before the limit leaves time for a
# step and a 7B checkpoint (~100 GB with optimizer state); the job then requeues itself.

# shellcheck source=launch/slurm_common.sh
source "${MTF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launch/slurm_common.sh"
mtf_pretrain transfusion-7b "$@"
