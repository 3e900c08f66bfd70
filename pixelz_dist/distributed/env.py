"""The one module that owns torchrun's environment and the process group (nothing else calls
``init_process_group``), the few collectives the library uses, and the DataLoader worker cap of this node.

Commands, for reference::

    python train.py                                            # one process
    torchrun --nproc_per_node=4 train.py                       # one node, one process per GPU
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 --rdzv_id=JOB train.py
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import psutil
import torch
import torch.distributed as tdist

from ..errors import ConfigError
from .preemption import Interrupted, Preempted

logger = logging.getLogger(__name__)

MAX_WORKERS_PER_GPU = 6  # the seed's cap: more workers than this rarely feed one GPU faster
DEFAULT_TIMEOUT_S = 600.0  # torch's 30-minute default lets a hung peer hold a whole job's GPUs for half an hour


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

    ``gpus_per_node`` is the number of local GPUs, at least one slot on a CPU-only machine. Under torchrun the CPUs
    are shared by the processes of this node (``local_processes``, LOCAL_WORLD_SIZE), which is the GPU count on a
    GPU node and the number of gloo processes on a CPU-only one.
    """
    if local_processes is None:
        local_processes = max(torch.cuda.device_count(), 1)
    return min(max(cpus_available(environ) // max(local_processes, 1), 1), MAX_WORKERS_PER_GPU)


def default_backend(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def local_gpu(env: DistEnv) -> torch.device:
    """Under torchrun, process LOCAL_RANK owns GPU LOCAL_RANK."""
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise ConfigError(f"LOCAL_RANK={env.local_rank} but this node has {count} visible GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one process per "
                          f"GPU. HINT: start torchrun with --nproc_per_node={count} (or 'gpu').")
    return torch.device("cuda", env.local_rank)


def timeout_seconds(timeout_s: float | None = None) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    return float(os.environ.get("PIXELZ_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def agent_store(timeout: timedelta):
    """A client of the store torchrun's agent hosts for the job (at MASTER_ADDR:MASTER_PORT, kept alive across
    elastic restarts), or None when no agent hosts one: not under torchrun, or ``env://`` where rank 0's process group
    will host it (nothing answers there before the group exists). ``timeout``: for every operation of the client."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)


def restart_attempt() -> str:
    """torchrun's restart count: keys in the agent's store are spaced per attempt (see :func:`init_process_group`)."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


_groups_created = [0]  # per process; every rank creates its groups in the same order, so the counts agree


def init_process_group(env: DistEnv, backend: str | None = None, timeout_s: float | None = None) -> None:
    """Join the job's process group.

    Under torchrun the agent keeps one TCP store alive across elastic restarts. A restarted group that rendezvouses
    through ``env://`` can read the previous attempt's keys and fail (``Gloo connectFullMesh failed``) or hang
    (pytorch/pytorch#135712, #167288), so the group is built over a key space of its own per restart attempt and
    per group.
    """
    backend = backend or default_backend(torch.cuda.is_available())
    timeout = timedelta(seconds=timeout_seconds(timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(local_gpu(env))
    client = agent_store(timeout)
    if client is not None:
        attempt = restart_attempt()
        # One key space per group, too: a second group in the same attempt (find_lr's runs, a user's own group
        # before ours) would otherwise meet the first one's keys and fail the same way.
        _groups_created[0] += 1
        store = tdist.PrefixStore(f"pixelz_dist/attempt_{attempt}/group_{_groups_created[0]}", client)
        tdist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
    else:
        tdist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                 timeout=timeout)
    if env.is_main:
        logger.info("process group: %s, %d processes, timeout %.0f s", backend, env.world_size,
                    timeout.total_seconds())


def gather_to_main(obj, env: DistEnv):
    """Every rank's ``obj``, as a list on rank 0 (None elsewhere); a plain one-element list without a group."""
    if not is_initialized():
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    tdist.gather_object(obj, out, dst=0)
    return out


def gather_from_all(obj) -> list:
    """Every rank's ``obj``, as a list on every rank (``[obj]`` without a group)."""
    if not is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


@contextmanager
def process_group(backend: str | None = None, timeout_s: float | None = None):
    """Make sure the job's process group exists for the duration of the block; yield this process's ``DistEnv``.

    Without torchrun's variables (or with WORLD_SIZE=1) there is nothing to set up. A group that already exists (made
    by the user, or by an enclosing ``process_group`` block such as ``find_lr``'s) is used as it is and left alone;
    a group this block created is destroyed when it exits (after a barrier when it ends normally), also on error.
    """
    env = read_env()
    if not env.is_distributed or torch.distributed.is_initialized():
        yield env
        return
    init_process_group(env, backend=backend, timeout_s=timeout_s)
    try:
        yield env
    except BaseException as e:
        why = explain_collective_failure(e, timeout_seconds(timeout_s))
        if why:
            logger.error("rank %d: %s", env.rank, why)
        # A preemption or a Ctrl-C ends every rank together after the snapshot; any other error may have left a
        # peer that never reaches a barrier.
        _destroy(together=isinstance(e, (Preempted, Interrupted)))
        raise
    _destroy(together=True)


# What gloo and NCCL say when a peer's process or node is gone (its sockets closed), and when it stopped answering
# (a network partition, a hung or stopped process): the collective gives up after the group's timeout.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer")
_NO_ANSWER = ("Timed out waiting", "timeout caused pair closure", "Watchdog caught collective operation timeout")


def explain_collective_failure(error: BaseException, timeout_s: float) -> str | None:
    """What a collective's failure means for the job and what to do, or None when ``error`` is not one.

    The backends' own messages (``Read error [10.0.0.2]:41234: Connection reset by peer``) name the peer's address
    but not the cause, and the traceback that carries them can be hundreds of lines from where a cluster user looks.
    """
    if not isinstance(error, RuntimeError):  # gloo raises RuntimeError; torch's DistError types derive from it
        return None
    text = str(error)
    resume = ("start the job again with --resume auto (load_snapshot_path='auto'): it continues from the newest "
              "complete snapshot")
    if any(words in text for words in _PEER_GONE):
        return (f"another process of the job is gone (its connection closed: {_first_line(text)}): that process or "
                f"its node died, so this one stops too. HINT: see the first failure in the other nodes' logs, then "
                f"{resume}")
    if any(words in text for words in _NO_ANSWER):
        return (f"another process stopped answering for the collective timeout ({timeout_s:g} s, "
                f"PIXELZ_DIST_TIMEOUT): the network between the nodes is cut, or a process hangs or was stopped "
                f"({_first_line(text)}). HINT: once the nodes reach each other again, {resume}")
    return None


def _first_line(text: str) -> str:
    """The backend's own words, without gloo's source-file prefix and its advice ("This is typically caused...")."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.split("] ", 1)[-1] if line.startswith("[/") else line
    return line.split(". ", 1)[0]


def _destroy(together: bool) -> None:
    """Destroy the default group. ``together``: every rank gets here; first they wait for each other, since a rank
    that only sent in the last collective (rank 0 in the last snapshot's broadcast) could otherwise take gloo's
    connections down under a send still in flight, and the process aborts ("terminate called without an active
    exception")."""
    if not tdist.is_initialized():
        return
    if together:
        tdist.barrier()
    tdist.destroy_process_group()


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def collective_device(device: torch.device) -> torch.device:
    """Where tensors for the default group's collectives must live: the GPU under nccl, else the CPU."""
    return device if is_initialized() and tdist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(values, device: torch.device) -> list[float]:
    """Sum floats (or 0-dim tensors) over ranks in one collective; plain floats back (a host sync)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    if is_initialized():
        tdist.all_reduce(t)
    return t.tolist()


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself without a group)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
