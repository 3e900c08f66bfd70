#!/usr/bin/env bash
# Train with pixelz_dist on several machines: run this script once on every node, with the same variables.
#
#   NNODES=2 HEAD_ADDR=node01 JOB_ID=exp6 launch/torchrun_multi_node.sh --config run.toml   # on node01 and node02
#   NNODES=1 HEAD_ADDR=localhost NPROC=2 launch/torchrun_multi_node.sh --demo               # a one-node try-out
#
# Variables:
#   NNODES     number of nodes (default: SLURM_JOB_NUM_NODES, else required)
#   HEAD_ADDR  address of the node that hosts the c10d rendezvous, reachable from every node (default: MASTER_ADDR,
#              else required)
#   PORT       rendezvous port on HEAD_ADDR (default: 29500)
#   JOB_ID     rendezvous id, the same on every node and unique per job (default: SLURM_JOB_ID, else required)
#   NPROC      processes per node (default: the number of GPUs torch sees, at least 1)
#   PYTHON     the Python that has pixelz_dist installed (default: python)
#   MODULE     what to run (default: pixelz_dist.train; pixelz_dist.find_lr for the learning-rate finder)
#   MAX_RESTARTS  torchrun's elastic restarts after a worker failure (default 0). After a node loss, start this
#              script again on the lost node (same variables): the other nodes' agents wait for it in the next
#              rendezvous and every worker resumes from the newest snapshot (give the run --resume auto).
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE  1 (default here): every rendezvous round gets a fresh store for the workers,
#              on a free port of the first node (so every port there must be reachable from the others). With torch's
#              default (0) a node whose agent was restarted never joined the others' restart: both agents waited 60 s
#              for each other's keys and the job failed (tests/test_multinode.py, torch 2.14).
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  (not set here; passed on to the trainers) the network interface gloo /
#              NCCL talk on, e.g. eth0 / ib0, on nodes with several (InfiniBand, docker0): without them each picks one
#              from the hostname, maybe one the other nodes cannot reach, and the job hangs in its first collective.
# torchrun forwards SIGUSR1 and SIGUSR2 to the trainers too (torch >= 2.10), which snapshot and exit with code 75.
set -euo pipefail

# shellcheck source=launch/torchrun_signals.sh
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_signals.sh"
nnodes="${NNODES:-${SLURM_JOB_NUM_NODES:?set NNODES, the number of nodes}}"
head_addr="${HEAD_ADDR:-${MASTER_ADDR:?set HEAD_ADDR, the address of the first node}}"
job_id="${JOB_ID:-${SLURM_JOB_ID:?set JOB_ID, an id shared by all nodes of this job}}"
python="${PYTHON:-python}"
pixelz_require_torch_signals "$python" || exit 2
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
nproc="${NPROC:-$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec "$python" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_addr:${PORT:-29500}" --rdzv_id="$job_id" \
    --max-restarts="${MAX_RESTARTS:-0}" --signals-to-handle="$PIXELZ_SIGNALS" \
    -m "${MODULE:-pixelz_dist.train}" "$@"
