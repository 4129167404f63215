# shellcheck shell=bash
# Shared by the sbatch scripts in launch/ (sourced, never run): the Python environment,
# the layout from the config, the torchrun rendezvous, the run directory and the
# preemption protocol. A script sources it with
#   source "${MTF_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launch/slurm_common.sh"
# because sbatch runs a spooled copy of the script: submit from the repository root (or set
# MTF_ROOT).
#
# Preemption protocol (also a time limit: the job re-runs until training is done):
#   1. Slurm sends USR1 to this batch shell only (#SBATCH --signal=B:USR1@LEAD, LEAD seconds
#      before the time limit; by hand: scancel --signal=USR1 --batch JOBID).
#   2. The trap forwards it once to srun, which forwards it to its task on every node: torchrun.
#   3. torchrun (python -m megatron_transfusion.launch, --signals_to_handle ... SIGUSR1)
#      forwards it to its workers and waits up to MTF_STOP_GRACE seconds for them before it
#      kills them; it then exits non-zero (128 + USR1, "stopped by SIGUSR1").
#   4. The trainer finishes the step, saves a checkpoint and exits with 3 (EXIT_PREEMPTED).
#   5. This shell goes by what it saw: a stop was requested and srun failed ->
#      `scontrol requeue`. The job re-runs with the same id (so
#      the same run directory) and SLURM_RESTART_COUNT + 1; `--resume auto` continues from
#      the checkpoint. srun succeeding means training finished first: the job completes.

set -euo pipefail # for the sourcing script too

MTF_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Any virtual or conda environment with this package installed.
MTF_ENV=${MTF_ENV:-$MTF_ROOT/.venv}
MTF_PYTHON=$MTF_ENV/bin/python
# The hardware the layout planner predicts for in a dry run (mtf-plan --cluster).
MTF_CLUSTER=${MTF_CLUSTER:-h100-80gb}
# How long torchrun waits for its workers to finish the step and save after the stop signal;
# keep it below the --signal lead time (Slurm delivers that signal up to ~60 s late).
MTF_STOP_GRACE=${MTF_STOP_GRACE:-480}

mtf_log() { echo "[mtf $(date +%H:%M:%S)] $*"; }
mtf_die() { echo "error: $*" >&2; exit 2; }

# A `#SBATCH --NAME=VALUE` default of the submitted script, for a dry run outside Slurm.
mtf_sbatch_default() {
    sed -n "s/^#SBATCH --$1=\([^ ]*\).*/\1/p" "$0" | head -n 1
}

# NCCL/CUDA settings for every GPU run; set any of them in the environment to override.
mtf_export_runtime_env() {
    # A failed or stuck collective aborts the process instead of hanging to the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Megatron-Core overlaps TP communication with compute only if kernels launch in order.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # Each rank is one process per GPU (or CPU slot): no thread oversubscription.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
}

# NCCL's flight recorder for hangs: every rank keeps its last collectives in a ring buffer
# and, when one times out (distributed.timeout_minutes), writes it to RUN_DIR/flight_recorder/
# rank_<N>; `torchfrtrace RUN_DIR/flight_recorder -p rank_` then shows which ranks stopped
# at which collective. The trainer's hang watchdog dumps the Python stacks before that
# (RUN_DIR/hangs/). Set any of them in the environment to override.
mtf_export_flight_recorder() {
    export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
    export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
    export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$1/flight_recorder/rank_}
    # The same prefix under the name earlier torch releases read.
    export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$TORCH_FR_DUMP_TEMP_FILE}
}

# Print "TP PP VPP ENGINE ZERO RECOMPUTE MICRO SEQ GLOBAL_TOKENS RUN_NAME OUTPUT_ROOT".
mtf_config_fields() {
    "$MTF_PYTHON" - "$@" <<'EOF'
import sys
from megatron_transfusion.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
p, d, r = cfg.parallel, cfg.data, cfg.run
print(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline or 1, p.engine, p.zero_stage,
      p.recompute, d.micro_batch_size, d.seq_length, d.global_batch_tokens, r.name, r.output_root)
EOF
}

# mtf_pretrain CONFIG [--dry-run] [OVERRIDE...]: one torchrun per Slurm task, each starting
# one worker per GPU of its node (one on a CPU-only node), all joined by a c10d rendezvous.
# It runs in the repository root: relative paths in overrides are relative to it.
mtf_pretrain() {
    cd "$MTF_ROOT"
    local config=$1 dry_run=0
    shift
    if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
    local overrides=("$@")

    # The allocation: from Slurm in a job, from the script's #SBATCH lines in a dry run
    # (SLURM_JOB_NUM_NODES=64 bash launch/pretrain_7b.sh --dry-run previews 64 nodes).
    local nodes tasks nproc
    nodes=${SLURM_JOB_NUM_NODES:-$(mtf_sbatch_default nodes)}
    nodes=${nodes:-1}
    tasks=${SLURM_NTASKS:-$(mtf_sbatch_default ntasks)}
    if [[ -z $tasks ]]; then
        local per_node
        per_node=$(mtf_sbatch_default ntasks-per-node)
        tasks=$((nodes * ${per_node:-1}))
    fi
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        nproc=${SLURM_GPUS_ON_NODE:-1}
    else
        nproc=$(mtf_sbatch_default gpus-per-node)
        nproc=${nproc:-1}
    fi

    # The layout is the config's (its parallel section, as the preset or overrides set it);
    # data parallelism takes the ranks that are left.
    local fields tp pp vpp engine zero recompute micro seq global name output_root
    fields=$(mtf_config_fields "$config" "${overrides[@]}")
    read -r tp pp vpp engine zero recompute micro seq global name output_root <<<"$fields"
    local world=$((tasks * nproc)) rows=$((global / seq))
    ((world % (tp * pp) == 0)) ||
        mtf_die "$world ranks do not split into tensor parallel $tp × pipeline parallel $pp"
    local dp=$((world / (tp * pp)))
    ((rows % (dp * micro) == 0)) ||
        mtf_die "$rows sequences per step do not split into $dp data-parallel ranks × micro-batches of $micro"

    # Values Slurm assigns at run time show as variables in a dry run.
    # shellcheck disable=SC2016 # literal placeholders
    local job='$SLURM_JOB_ID' master='$MASTER_ADDR' port='$MASTER_PORT'
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        job=$SLURM_JOB_ID
        master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        # Per job, so two jobs sharing a node never collide; a requeued job keeps its port.
        port=$((20000 + SLURM_JOB_ID % 40000))
    fi
    # One run directory per job (a requeued job keeps its id, so it resumes there); an
    # explicit run.name=... override names it instead, e.g. to continue an earlier job's run.
    local run_name="$name-$job" override
    for override in "${overrides[@]}"; do
        if [[ $override == run.name=* ]]; then run_name=$name; fi
    done

    mtf_export_runtime_env
    mtf_export_flight_recorder "$output_root/$run_name"
    # torchrun forwards these to its workers (its default list lacks the stop signal, USR1).
    # Through the project's launcher: a user mistake ends in the workers' one error line
    # and exit 2 in the job log, not in torchrun's ChildFailedError traceback.
    local signals=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    local torchrun=("$MTF_PYTHON" -m megatron_transfusion.launch
        --nnodes="$tasks" --nproc_per_node="$nproc"
        --rdzv_backend=c10d --rdzv_endpoint="$master:$port" --rdzv_id="$job"
        --max_restarts=0 --signals_to_handle="$signals" --shutdown_timeout="$MTF_STOP_GRACE"
        -m megatron_transfusion.train --config "$config" --resume auto
        "${overrides[@]}" run.name="$run_name")
    # --kill-on-bad-exit: a crash on one node ends the others instead of leaving them
    # blocked in a collective (after a stop every rank exits only once the save is published).
    local launch=(srun --ntasks="$tasks" --kill-on-bad-exit=1 "${torchrun[@]}")

    mtf_log "config $config: $nodes node(s), $tasks task(s) × $nproc process(es) = $world ranks"
    mtf_log "layout: TP $tp × PP $pp (virtual $vpp) × DP $dp; engine $engine, ZeRO stage $zero, recompute $recompute"
    mtf_log "batch: $rows sequences × $seq tokens = $global tokens per step;" \
        "micro-batch $micro × $((rows / (dp * micro))) gradient accumulation steps per DP rank"
    mtf_log "run directory: $output_root/$run_name (restart ${SLURM_RESTART_COUNT:-0})"
    mtf_log "env: TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG=$NCCL_DEBUG" \
        "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS=$OMP_NUM_THREADS"
    mtf_log "flight recorder: TORCH_NCCL_TRACE_BUFFER_SIZE=$TORCH_NCCL_TRACE_BUFFER_SIZE" \
        "TORCH_NCCL_DUMP_ON_TIMEOUT=$TORCH_NCCL_DUMP_ON_TIMEOUT TORCH_FR_DUMP_TEMP_FILE=$TORCH_FR_DUMP_TEMP_FILE"
    mtf_log "command: ${launch[*]}"
    if ((dry_run)); then
        # The layout planner's prediction for exactly this layout; it fails if it does not fit.
        "$MTF_PYTHON" -m megatron_transfusion.planning.cli --check --cluster "$MTF_CLUSTER" --gpus "$world" \
            --config "$config" "${overrides[@]}" | sed 's/^/[mtf plan] /'
        return 0
    fi
    [[ -n ${SLURM_JOB_ID:-} ]] || mtf_die "not in a Slurm job: submit with sbatch, or add --dry-run"
    mkdir -p "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")" # torch writes the files, not the directory
    mtf_run_preemptible "${launch[@]}"
}

MTF_STOPS=0
MTF_FORWARDED=0
MTF_STEP_PID=

mtf_request_stop() {
    MTF_STOPS=$((MTF_STOPS + 1))
    mtf_log "got USR1: asking the trainer to save and stop"
    mtf_forward_stop
}

# Once: a second USR1 would interrupt torchrun while it waits for its workers.
mtf_forward_stop() {
    if ((MTF_STOPS && !MTF_FORWARDED)) && [[ -n $MTF_STEP_PID ]]; then
        MTF_FORWARDED=1
        kill -USR1 "$MTF_STEP_PID" 2>/dev/null || true
    fi
}

# Run the launch command (srun ...) with the preemption protocol described above.
mtf_run_preemptible() {
    trap mtf_request_stop USR1
    "$@" &
    MTF_STEP_PID=$!
    mtf_forward_stop # a signal that came before the pid was known
    local rc seen=0
    while :; do
        rc=0
        wait "$MTF_STEP_PID" || rc=$?
        ((MTF_STOPS > seen)) || break # the step ended
        seen=$MTF_STOPS               # the trap interrupted the wait: wait again
    done
    if ((rc == 0)); then
        mtf_log "training finished"
        return 0
    fi
    if ((MTF_STOPS)); then
        mtf_log "stopped on request (srun exit $rc): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    mtf_log "srun failed with exit code $rc"
    return "$rc"
}
