#!/usr/bin/env bash
# Start a one-node SLURM cluster on localhost, for testing the sbatch scripts (tests/test_slurm.py uses it).
#
#   launch/local_slurm/start.sh DIR        # then: export SLURM_CONF=DIR/slurm.conf; sbatch ...
#   launch/local_slurm/stop.sh DIR
#
# Needs root and Debian's packages: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# Variables:
#   SLURMCTLD_PORT, SLURMD_PORT   ports of the two daemons (default 6817, 6818; choose free ones to run two clusters)
#   START_TIMEOUT                 seconds to wait for the node to become idle (default 60)
# Files: SLURM's (slurm.conf, state, spool, logs, pid files) all go under DIR. Outside DIR, only when no munge
# daemon answers: start.sh creates /run/munge, /var/log/munge and /var/lib/munge (owned by the munge user, as the
# munge package's service would) and starts munged, which writes its socket and pid file in /run/munge, its log in
# /var/log/munge and its seed in /var/lib/munge (its key, /etc/munge/munge.key, comes with the package); and
# /run/pixelz-munge, which records the local clusters using a munged started here (launch/shared_munge.sh). stop.sh
# stops that munged once no local cluster uses it (a launch/local_cluster may share it); the folders stay.
set -euo pipefail

dir="${1:?usage: start.sh DIR}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
ctld_port="${SLURMCTLD_PORT:-6817}"
slurmd_port="${SLURMD_PORT:-6818}"
timeout="${START_TIMEOUT:-60}"

for tool in munged munge unmunge slurmctld slurmd scontrol sinfo; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin"
    command -v "$tool" >/dev/null 2>&1 || { echo "start.sh: $tool not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done

# munge: one daemon per machine, shared with a local_cluster that may be up too (launch/shared_munge.sh).
# shellcheck source=launch/shared_munge.sh
source "$here/../shared_munge.sh"
munge_start "$dir"

mkdir -p "$dir/state" "$dir/spool" "$dir/log"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 8 / 10 / 1024 ))
sed -e "s|@DIR@|$dir|g" -e "s|@CPUS@|$(nproc)|g" -e "s|@MEM@|$mem_mb|g" \
    -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" "$here/slurm.conf.in" > "$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf"

slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localhost   # the node is named localhost, whatever the machine's hostname

deadline=$(( SECONDS + timeout ))
until scontrol ping 2>/dev/null | grep -q UP && [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = idle ]; do
    if (( SECONDS > deadline )); then
        echo "start.sh: the node did not become idle within ${timeout}s; logs in $dir/log" >&2
        exit 1
    fi
    sleep 0.2
done
echo "SLURM_CONF=$SLURM_CONF"
