#!/usr/bin/env bash
# Sourced by the launch scripts (not run): which signals torchrun must forward to the trainers, and a check that
# this torch's torchrun can. A plain torchrun dies on SIGUSR1/SIGUSR2 (SLURM's usual preemption warnings) and
# orphans its workers; --signals-to-handle, which makes it forward them, first shipped in torch 2.10.0
# (pytorch/pytorch#160690). The check reads the installed version without importing torch (a fraction of a second).

# shellcheck disable=SC2034  # used by the scripts that source this file
PIXELZ_SIGNALS=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2

pixelz_require_torch_signals() {  # $1: the Python that will run torchrun
    "$1" - <<'PY' || return 2
import importlib.metadata as metadata
import sys

try:
    version = metadata.version("torch")
except metadata.PackageNotFoundError:
    sys.exit(f"error: torch is not installed for {sys.executable}. HINT: pip install pixelz-dist (or set PYTHON "
             "to the Python that has it)")
major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in (version.split(".") + ["0"])[:2])
if (major, minor) < (2, 10):
    sys.exit(f"error: torch {version} ({sys.executable}) is older than 2.10: its torchrun has no "
             "--signals-to-handle, so a preemption warning (SIGUSR1/SIGUSR2) would kill torchrun and orphan the "
             "trainers instead of reaching them. HINT: pip install 'torch>=2.10' (pixelz-dist requires it)")
PY
}
