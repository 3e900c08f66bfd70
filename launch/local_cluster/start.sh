#!/usr/bin/env bash
# Start an N-node test cluster on this machine: one network namespace per node (own address, hostname and hosts
# file), joined by a bridge, and a SLURM cluster over them (slurmctld and a slurmd on node1, a slurmd on every other
# node). For testing the multi-node launch scripts without a second machine (tests/test_multinode.py uses it).
#
#   launch/local_cluster/start.sh 2 DIR              # nodes node1, node2 at SUBNET.1, SUBNET.2
#   launch/local_cluster/on.sh DIR node2 CMD ARGS... # run CMD on node2 (its network, hostname and /etc/hosts)
#   launch/local_cluster/on.sh DIR node1 sbatch --nodes=2 ...   # SLURM clients run on a node, SLURM_CONF=DIR/slurm.conf
#   ip -n "$NS_PREFIX-node2" link set eth0 down      # a network partition (NS_PREFIX: see DIR/cluster.env); up again
#   launch/local_cluster/stop.sh DIR                 # stops everything and removes the namespaces
#
# Needs root, iproute2 and util-linux (nsenter, unshare, mountpoint); with SLURM=1 also Debian's packages:
# apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
# Variables:
#   SUBNET          the first three numbers of the cluster's /24 network (default 10.213.7); nodeI gets SUBNET.I.
#                   Refused when the host already has an address or a route in it.
#   NS_PREFIX       prefix of the namespaces' names (default pxc-<8 hex digits from DIR>): NS_PREFIX-node1 ...
#                   and NS_PREFIX-switch, which holds the bridge
#   SLURM           1 (default): start the SLURM cluster too; 0: the network only
#   SLURMCTLD_PORT, SLURMD_PORT   ports of the daemons (default 6817, 6818); every node has a network of its own, so
#                   they do not collide with a SLURM running on the host
#   START_TIMEOUT   seconds to wait for every node to become idle in SLURM (default 60)
# Files: the cluster's own (cluster.env, hosts, slurm.conf, state, spool, logs, pid files) go under DIR. Outside DIR:
# the network namespaces in /run/netns (ip makes /run/netns a mount point on first use; stop.sh undoes both), and,
# when no munge daemon answers, munged (one for the machine: the nodes share its socket) with the folders it needs,
# /run/munge, /var/log/munge and /var/lib/munge, created as for launch/local_slurm, and /run/pixelz-munge
# (launch/shared_munge.sh); stop.sh stops that munged once no local cluster uses it, and the folders stay.
# A failed start stops what it started.
set -euo pipefail

nodes="${1:?usage: start.sh N DIR}"
dir="${2:?usage: start.sh N DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
PATH="$PATH:/usr/sbin:/sbin"
[[ "$nodes" =~ ^[1-9][0-9]?$ ]] || { echo "start.sh: N must be a number of nodes from 1 to 99, not '$nodes'" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "start.sh: needs root (network namespaces, mounts, daemons)" >&2; exit 1; }
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
subnet="${SUBNET:-10.213.7}"
prefix="${NS_PREFIX:-pxc-$(printf %s "$dir" | md5sum | cut -c1-8)}"
slurm="${SLURM:-1}"
ctld_port="${SLURMCTLD_PORT:-6817}"
slurmd_port="${SLURMD_PORT:-6818}"
timeout="${START_TIMEOUT:-60}"

tools=(ip nsenter unshare mountpoint)
if [ "$slurm" = 1 ]; then tools+=(munged munge unmunge slurmctld slurmd scontrol sinfo); fi
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "start.sh: $tool not found (apt-get install iproute2 util-linux; for SLURM: slurmctld slurmd slurm-client munge)" >&2
        exit 1
    }
done
[[ "$subnet" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "start.sh: SUBNET=$subnet is not three numbers like 10.213.7" >&2; exit 2; }
used="$(ip -4 -o addr show; ip -4 route show)"  # not piped into grep -q: its early exit fails the pipe (pipefail)
if grep -Eq "(^|[^0-9.])${subnet//./\\.}\.[0-9]" <<< "$used"; then
    echo "start.sh: this machine already has an address or route in $subnet.0/24. HINT: choose another SUBNET=" >&2
    exit 1
fi
if [ -e "$dir/cluster.env" ]; then
    echo "start.sh: $dir/cluster.env exists: a cluster may be running there. HINT: launch/local_cluster/stop.sh $dir" >&2
    exit 1
fi

# iproute2 makes /run/netns a mount point of its own on first use; stop.sh undoes that only if it was not one before.
netns_mount=0
mountpoint -q /run/netns 2>/dev/null || netns_mount=1
names=()
for i in $(seq "$nodes"); do names+=("node$i"); done
cat > "$dir/cluster.env" <<ENV
NODES="${names[*]}"
NS_PREFIX=$prefix
SUBNET=$subnet
SLURM=$slurm
NETNS_MOUNT=$netns_mount
ENV
trap '"$here/stop.sh" "$dir" >&2 || true' EXIT  # a failed start cleans up; cleared at the end

# The network: a bridge in a namespace of its own (the host's network is not touched), one veth pair per node.
ip netns add "$prefix-switch"
ip -n "$prefix-switch" link add br0 type bridge
ip -n "$prefix-switch" link set br0 up
{
    echo "127.0.0.1 localhost"
    for i in $(seq "$nodes"); do echo "$subnet.$i node$i"; done
} > "$dir/hosts"
for i in $(seq "$nodes"); do
    ns="$prefix-node$i"
    ip netns add "$ns"
    ip link add eth0 netns "$ns" type veth peer name "port$i" netns "$prefix-switch"
    ip -n "$prefix-switch" link set "port$i" master br0 up
    ip -n "$ns" addr add "$subnet.$i/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
done

if [ "$slurm" = 1 ]; then
    # one munged per machine, shared with a local_slurm that may be up too
    # shellcheck source=launch/shared_munge.sh
    source "$here/../shared_munge.sh"
    munge_start "$dir"
    mkdir -p "$dir/state" "$dir/log"
    cpus="$(nproc)"
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 8 / 10 / 1024 / nodes ))
    sed -e "s|@DIR@|$dir|g" -e "s|@N@|$nodes|g" -e "s|@HEAD_ADDR@|$subnet.1|g" \
        -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" "$here/slurm.conf.in" > "$dir/slurm.conf"
    for i in $(seq "$nodes"); do
        echo "NodeName=node$i NodeAddr=$subnet.$i CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >> "$dir/slurm.conf"
        mkdir -p "$dir/spool_node$i"
    done
    echo "PartitionName=debug Default=YES Nodes=node[1-$nodes] MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"
    export SLURM_CONF="$dir/slurm.conf"
    # Not `ip netns exec`: it remounts /sys, and slurmd then finds no cgroup hierarchy on a cgroup-v1 host.
    # shellcheck disable=SC2016  # expanded on the node
    "$here/on.sh" "$dir" node1 bash -c 'slurmctld -f "$SLURM_CONF" && slurmd -f "$SLURM_CONF" -N node1'
    for i in $(seq 2 "$nodes"); do
        "$here/on.sh" "$dir" "node$i" slurmd -f "$SLURM_CONF" -N "node$i"
    done
    deadline=$(( SECONDS + timeout ))
    until "$here/on.sh" "$dir" node1 scontrol ping 2>/dev/null | grep -q UP &&
          [ "$("$here/on.sh" "$dir" node1 sinfo -h -N -o %t 2>/dev/null | grep -cx idle)" = "$nodes" ]; do
        if (( SECONDS > deadline )); then
            echo "start.sh: not every node became idle within ${timeout}s; logs in $dir/log" >&2
            exit 1
        fi
        sleep 0.2
    done
fi
trap - EXIT
echo "NODES=${names[*]}"
echo "NS_PREFIX=$prefix"
for i in $(seq "$nodes"); do echo "node$i=$subnet.$i"; done
if [ "$slurm" = 1 ]; then echo "SLURM_CONF=$dir/slurm.conf"; fi
