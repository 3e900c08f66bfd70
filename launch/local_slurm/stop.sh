#!/usr/bin/env bash
# Stop the cluster that launch/local_slurm/start.sh DIR started: cancel its jobs, stop slurmd and slurmctld (by the
# pids in DIR), and munged when start.sh started it.
#
#   launch/local_slurm/stop.sh DIR
set -euo pipefail

dir="${1:?usage: stop.sh DIR}"
dir="$(cd "$dir" && pwd)"
export SLURM_CONF="$dir/slurm.conf"
PATH="$PATH:/usr/sbin"

if [ -f "$SLURM_CONF" ]; then
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
fi

stop_pid_file() {
    local pid_file="$1" pid
    [ -f "$pid_file" ] || return 0
    pid="$(cat "$pid_file")"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

stop_pid_file "$dir/slurmd.pid"
stop_pid_file "$dir/slurmctld.pid"
# munged: only when start.sh started it and no other local cluster still uses it
# shellcheck source=launch/shared_munge.sh
source "$(cd "$(dirname "$0")" && pwd)/../shared_munge.sh"
munge_stop "$dir"
