#!/usr/bin/env bash
# A real single-node Slurm on this machine (Debian's slurmctld + slurmd + MUNGE), for the
# tests and for trying the sbatch scripts without a cluster. Needs root.
#
#   eval "$(bash launch/local_slurm.sh start)"   # install if missing, start, wait for the node
#   sbatch launch/pretrain_tiny.sh               # ... any sbatch/squeue/scontrol command
#   bash launch/local_slurm.sh stop              # cancel its jobs, stop the daemons
#
# `start` is idempotent (it starts only what is not running) and prints the one line
# `export SLURM_CONF=...` that client commands need, and exits with 3 if Slurm cannot be
# installed here (not root, or apt-get failed). `status` exits 0 when all daemons run.
# Config, state, logs and pid files live in $MTF_SLURM_DIR (default /tmp/mtf-slurm); a
# start from stopped forgets old jobs. Daemons are stopped by their pid files, never by name.
set -euo pipefail

STATE=${MTF_SLURM_DIR:-/tmp/mtf-slurm}
CPUS=${MTF_SLURM_CPUS:-4}  # advertised; more than the cores so a job and an array can share it
NODE=$(hostname -s)
export SLURM_CONF=$STATE/etc/slurm.conf
# munged runs as user munge, so everything of its own lives in its own directory.
declare -A PIDFILE=([munged]=$STATE/munge/munged.pid [slurmctld]=$STATE/run/slurmctld.pid
                    [slurmd]=$STATE/run/slurmd.pid)
# Daemons run with a clean environment, so jobs see only what sbatch passes on.
CLEAN_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)

say() { echo "local_slurm: $*" >&2; }
die() { say "$*"; exit 1; }
unavailable() { say "$*"; exit 3; }

# The pid of a running daemon from its pid file, or nothing.
pid_of() {
    local file=${PIDFILE[$1]} pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    if [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$1" ]]; then echo "$pid"; fi
}

install_packages() {
    local missing=0 tool
    for tool in munged slurmctld slurmd sbatch tini; do
        command -v "$tool" >/dev/null || missing=1
    done
    ((missing)) || return 0
    say "installing slurmctld slurmd slurm-client munge tini with apt-get (log: $STATE/apt.log)"
    mkdir -p "$STATE"
    if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
        --no-install-recommends slurmctld slurmd slurm-client munge tini; } >"$STATE/apt.log" 2>&1; then
        tail -n 20 "$STATE/apt.log" >&2
        unavailable "apt-get could not install Slurm (log: $STATE/apt.log)"
    fi
}

write_config() {
    mkdir -p "$STATE"/{etc,ctld,d,run,log}
    install -d -m 0755 -o munge -g munge "$STATE/munge"  # munged refuses a socket dir without o+x
    if [[ ! -s $STATE/munge/munge.key ]]; then
        head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
        chown munge:munge "$STATE/munge/munge.key"
        chmod 0400 "$STATE/munge/munge.key"
    fi
    # Scheduler intervals of 2 s and cred_expire=5 (the minimum) start jobs and requeued jobs in
    # seconds; proctrack/pgid ends a batch script's children when it exits from a trap.
    cat >"$SLURM_CONF" <<EOF
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemons() {
    if [[ -z $(pid_of munged) || -z $(pid_of slurmctld) ]]; then
        write_config  # never rewritten under running daemons
    fi
    if [[ -z $(pid_of munged) ]]; then
        "${CLEAN_ENV[@]}" runuser -u munge -- munged --socket="$STATE/munge/munge.socket.2" \
            --key-file="$STATE/munge/munge.key" --pid-file="${PIDFILE[munged]}" \
            --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
    fi
    if [[ -z $(pid_of slurmctld) ]]; then
        "${CLEAN_ENV[@]}" SLURM_CONF="$SLURM_CONF" slurmctld -c  # daemonizes
    fi
    if [[ -z $(pid_of slurmd) ]]; then
        # tini as a subreaper: PID 1 here reaps late, which costs every srun step seconds.
        "${CLEAN_ENV[@]}" SLURM_CONF="$SLURM_CONF" setsid tini -s -- slurmd -D -N "$NODE" \
            </dev/null >>"$STATE/log/slurmd.out" 2>&1 &
    fi
}

start() {
    if ! status >/dev/null; then
        [[ $EUID -eq 0 ]] || unavailable "needs root (it installs packages and runs slurmd as root)"
        install_packages
        start_daemons
    fi
    local state deadline=$((SECONDS + 60))
    until state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null) && [[ $state =~ ^(idle|mix|alloc)$ ]]; do
        if ((SECONDS > deadline)); then
            tail -n 5 "$STATE"/log/* "$STATE/munge/munged.log" >&2 || true
            die "node $NODE did not come up (state '${state:-none}'); logs in $STATE/log"
        fi
        sleep 0.2
    done
    say "node $NODE is $state (state in $STATE)"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local daemon pid jobs deadline
    if [[ -n $(pid_of slurmctld) ]]; then
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086 # one job id per word
            scancel $jobs || true
            deadline=$((SECONDS + 20))
            while [[ -n $(squeue -h -t R,CG -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do
                sleep 0.2
            done
        fi
    fi
    for daemon in slurmd slurmctld munged; do
        pid=$(pid_of "$daemon")
        [[ -n $pid ]] || continue
        kill -TERM "$pid"
        deadline=$((SECONDS + 10))
        while [[ -e /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.1; done
        [[ ! -e /proc/$pid ]] || kill -KILL "$pid"
        say "stopped $daemon ($pid)"
    done
}

status() {
    local daemon ok=0
    for daemon in munged slurmctld slurmd; do
        if [[ -n $(pid_of "$daemon") ]]; then echo "$daemon running"; else echo "$daemon stopped"; ok=1; fi
    done
    return "$ok"
}

case ${1:-} in
    start | stop | status) "$1" ;;
    *) die "usage: $0 start|stop|status" ;;
esac
