"""The one place that reads torchrun's environment and decides how many CPUs and workers this process gets."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

MAX_WORKERS_PER_GPU = 6  # the seed's cap: more workers than this rarely feed one GPU faster


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as torchrun (or the user) set it in the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def read_env(environ=None) -> DistEnv:
    """Read RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE; absent means a single process."""
    env = os.environ if environ is None else environ

    def get(name: str, default: int) -> int:
        value = env.get(name)
        if value in (None, ""):
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

    world = get("WORLD_SIZE", 1)
    return DistEnv(rank=get("RANK", 0), local_rank=get("LOCAL_RANK", 0), world_size=world,
                   local_world_size=get("LOCAL_WORLD_SIZE", 1 if world == 1 else world))


def cpus_available(environ=None) -> int:
    """CPUs this process may run on: its affinity mask, capped by SLURM_CPUS_PER_TASK when SLURM set it."""
    env = os.environ if environ is None else environ
    try:
        cpus = len(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError, psutil.Error):  # macOS has no affinity
        cpus = psutil.cpu_count(logical=True) or 1
    slurm = env.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(cpus, 1)


def default_num_workers(local_processes: int | None = None, environ=None) -> int:
    """The seed's policy: ``min(max(cpus // gpus_per_node, 1), 6)``.

    ``gpus_per_node`` is the number of local GPUs, at least one slot on a CPU-only machine; when several local
    processes share the node (``local_processes``), the CPUs are shared among them instead.
    """
    if local_processes is None:
        local_processes = max(torch.cuda.device_count(), 1)
    return min(max(cpus_available(environ) // max(local_processes, 1), 1), MAX_WORKERS_PER_GPU)
