#!/usr/bin/env bash
# Shared by slurm_train.sbatch and slurm_find_lr.sbatch (sourced, not run): one srun task per node, each running
# torchrun with a c10d rendezvous at the first node; SLURM's preemption warning (USR1, or USR2 if you ask for that
# one with --signal) is forwarded to the trainers, which snapshot and exit with code 75; the job then requeues itself
# and resumes from that snapshot. Needs torch >= 2.10 (torchrun --signals-to-handle): checked before srun starts.
#
# Variables (set them in the environment of sbatch, which exports it to the job, or edit the defaults below):
#   PYTHON        the Python that has pixelz_dist installed (default: python)
#   NPROC         processes per node (default: the GPUs SLURM gave the job on this node, SLURM_GPUS_ON_NODE, else 1;
#                 set NPROC for CPU-only jobs: one gloo process per NPROC)
#   RDZV_PORT     the rendezvous port on the first node (default: 29500 + job id % 1000, so that two jobs sharing a
#                 node do not collide)
#   MAX_RESTARTS  torchrun's elastic restarts after a worker failure (default 0)
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE  1 (default here): a fresh store per rendezvous round, so that a restarted
#                 node's agent can join the others' next round (see launch/torchrun_multi_node.sh)
#   REQUEUE       1 (default): requeue the job when it was preempted; 0: just exit with code 75

# shellcheck source=launch/torchrun_signals.sh
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_signals.sh"

pixelz_slurm_run() {
    local module="$1"
    shift
    local python="${PYTHON:-python}"
    pixelz_require_torch_signals "$python" || return 2
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
    local nproc="${NPROC:-${SLURM_GPUS_ON_NODE:-1}}"
    local head_node port
    head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    port="${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
    echo "pixelz: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s) x $nproc" \
         "process(es), rendezvous at $head_node:$port: $module $*"

    # SLURM sends --signal=B:USR1 to this shell only. A bash trap runs only while the shell waits, so srun runs in
    # the background; the trap forwards the signal to srun, which passes it to torchrun on every node. torchrun
    # forwards it to its workers because of --signals-to-handle (a plain torchrun dies on USR1 and orphans them).
    # USR2 is handled the same way, for clusters whose preemption notice is --signal=B:USR2.
    preempted=0
    interrupted=0
    srun_pid=""
    # SLURM 22.05 changed srun to no longer take --cpus-per-task from sbatch's SLURM_CPUS_PER_TASK: pass it, so
    # that where cgroups confine steps torchrun and its workers keep the task's CPUs. The DataLoader cap reads it.
    local cpus=()
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    # shellcheck disable=SC2317  # run by the traps below
    pixelz_forward() {  # $1: USR1 or USR2
        preempted=1
        interrupted=1
        echo "pixelz: preemption warning ($1), forwarding it to the trainers"
        if [ -n "$srun_pid" ]; then kill "-$1" "$srun_pid" 2>/dev/null || true; fi
    }
    trap 'pixelz_forward USR1' USR1
    trap 'pixelz_forward USR2' USR2
    srun --ntasks-per-node=1 ${cpus[@]+"${cpus[@]}"} --kill-on-bad-exit=1 \
        "$python" -m torch.distributed.run \
        --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$nproc" \
        --rdzv_backend=c10d --rdzv_endpoint="$head_node:$port" --rdzv_id="$SLURM_JOB_ID" \
        --max-restarts="${MAX_RESTARTS:-0}" --signals-to-handle="$PIXELZ_SIGNALS" \
        -m "$module" "$@" &
    srun_pid=$!
    local rc
    while :; do
        interrupted=0
        rc=0
        wait "$srun_pid" || rc=$?
        # wait returns > 128 when the trap interrupted it: srun goes on, wait again for its real exit code.
        if [ "$interrupted" = 1 ] && [ "$rc" -gt 128 ]; then continue; fi
        break
    done
    trap - USR1 USR2

    # The trainers exit with 75 after their snapshot; torchrun reports a failed worker as 1, so the trap's flag says
    # whether this was a preemption. The snapshot is complete before srun returns: requeueing now is safe
    # (scontrol requeue ends this script at once).
    if [ "$rc" -ne 0 ] && { [ "$preempted" = 1 ] || [ "$rc" -eq 75 ]; }; then
        if [ "${REQUEUE:-1}" = 1 ]; then
            echo "pixelz: preempted (exit code $rc): requeueing job $SLURM_JOB_ID, it resumes from its snapshot"
            scontrol requeue "$SLURM_JOB_ID"
        fi
        return 75
    fi
    return "$rc"
}
