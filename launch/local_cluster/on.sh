#!/usr/bin/env bash
# Run a command on one node of the cluster that launch/local_cluster/start.sh DIR started: in the node's network
# namespace, with its hostname and the cluster's hosts file over /etc/hosts (in a mount namespace of the command's
# own, so the host's /etc/hosts is not touched). The environment is passed on unchanged.
#
#   launch/local_cluster/on.sh DIR node2 hostname      # prints node2
#   NNODES=2 HEAD_ADDR=node1 JOB_ID=1 launch/local_cluster/on.sh DIR node2 launch/torchrun_multi_node.sh --demo
set -euo pipefail

dir="${1:?usage: on.sh DIR NODE CMD [ARGS...]}"
node="${2:?usage: on.sh DIR NODE CMD [ARGS...]}"
shift 2
[ "$#" -gt 0 ] || { echo "usage: on.sh DIR NODE CMD [ARGS...]" >&2; exit 2; }
dir="$(cd "$dir" && pwd)"
[ -f "$dir/cluster.env" ] || { echo "on.sh: no cluster in $dir (start it with launch/local_cluster/start.sh N $dir)" >&2; exit 1; }
# shellcheck source=/dev/null
source "$dir/cluster.env"
[[ " $NODES " == *" $node "* ]] || { echo "on.sh: no node '$node' in $dir (nodes: $NODES)" >&2; exit 2; }
PATH="$PATH:/usr/sbin:/sbin"
# unshare --mount makes the new mount namespace private: the bind mount stays inside it and ends with the command.
# shellcheck disable=SC2016  # the inner bash expands them
exec nsenter --net="/run/netns/$NS_PREFIX-$node" unshare --mount --uts -- \
    bash -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' on.sh "$dir/hosts" "$node" "$@"
