#!/usr/bin/env bash
# Stop the cluster that launch/local_cluster/start.sh N DIR started and leave nothing behind: cancel its jobs, stop
# slurmctld and the slurmds (by the pid files in DIR), end every other process still in a node's network, delete the
# namespaces (their veths and the bridge go with them), stop munged and unmount /run/netns when start.sh started or
# mounted them. The files in DIR stay (logs); DIR/cluster.env is removed. Safe to run twice.
#
#   launch/local_cluster/stop.sh DIR
# Variables:
#   STOP_GRACE   seconds a process gets between SIGTERM and SIGKILL (default 5)
set -euo pipefail

dir="${1:?usage: stop.sh DIR}"
[ -d "$dir" ] || exit 0
dir="$(cd "$dir" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
PATH="$PATH:/usr/sbin:/sbin"
grace="${STOP_GRACE:-5}"
[ -f "$dir/cluster.env" ] || exit 0
# shellcheck source=/dev/null
source "$dir/cluster.env"

stop_pids() {  # PID...: SIGTERM, then SIGKILL to those still alive after the grace time
    [ "$#" -gt 0 ] || return 0
    kill "$@" 2>/dev/null || true
    local deadline=$(( SECONDS + grace )) pid alive
    while :; do
        alive=()
        for pid in "$@"; do if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi; done
        [ "${#alive[@]}" -gt 0 ] || return 0
        if (( SECONDS >= deadline )); then kill -9 "${alive[@]}" 2>/dev/null || true; return 0; fi
        sleep 0.1
    done
}

if [ "$SLURM" = 1 ] && [ -f "$dir/slurm.conf" ] && [ -e "/run/netns/$NS_PREFIX-node1" ]; then
    SLURM_CONF="$dir/slurm.conf" timeout 10 "$here/on.sh" "$dir" node1 scancel --quiet --user=root 2>/dev/null || true
fi
daemons=()  # stopped together: a slurmd takes a few seconds to end
for pid_file in "$dir"/slurmd_*.pid "$dir/slurmctld.pid"; do
    if [ -f "$pid_file" ]; then daemons+=("$(cat "$pid_file")"); rm -f "$pid_file"; fi
done
stop_pids ${daemons[@]+"${daemons[@]}"}
for name in $NODES switch; do
    ns="$NS_PREFIX-$name"
    [ -e "/run/netns/$ns" ] || continue
    # shellcheck disable=SC2046  # one pid per word
    stop_pids $(ip netns pids "$ns")
    ip netns delete "$ns"
done
if [ "$SLURM" = 1 ]; then  # munged: only when start.sh started it and no other local cluster still uses it
    # shellcheck source=launch/shared_munge.sh
    source "$here/../shared_munge.sh"
    munge_stop "$dir"
fi
if [ "$NETNS_MOUNT" = 1 ] && mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ]; then
    umount /run/netns
fi
rm -f "$dir/cluster.env"
