#!/usr/bin/env bash
# Train with pixelz_dist on every GPU of this machine (or NPROC processes), through torchrun.
#
#   launch/torchrun_single_node.sh --config run.toml                 # arguments go to python -m pixelz_dist.train
#   NPROC=2 launch/torchrun_single_node.sh --demo --epochs 3         # CPU only: 2 gloo processes
#   MODULE=pixelz_dist.find_lr launch/torchrun_single_node.sh --config run.toml --method sweep
#
# Variables:
#   PYTHON   the Python that has pixelz_dist installed (default: python)
#   NPROC    processes (default: the number of GPUs torch sees, at least 1)
#   MODULE   what to run (default: pixelz_dist.train; pixelz_dist.find_lr for the learning-rate finder)
# torchrun forwards SIGUSR1 and SIGUSR2 to the trainers too (--signals-to-handle, torch >= 2.10), which snapshot and
# exit with code 75.
set -euo pipefail

# shellcheck source=launch/torchrun_signals.sh
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_signals.sh"
python="${PYTHON:-python}"
pixelz_require_torch_signals "$python" || exit 2
nproc="${NPROC:-$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    --signals-to-handle="$PIXELZ_SIGNALS" \
    -m "${MODULE:-pixelz_dist.train}" "$@"
