"""The seed's multi-GPU calling convention, on top of torch's own elastic launcher (no home-made spawner).

The user sets RANK = this node's rank, WORLD_SIZE = the number of nodes, MASTER_ADDR and MASTER_PORT, then calls
``train_model_multigpu(...)`` (or ``find_lr_multigpu``) from a plain ``python`` process. :func:`run_per_gpu` starts
one worker process per local GPU (or ``nproc_per_node`` CPU processes with gloo) through
``torch.distributed.launcher.elastic_launch`` with a static rendezvous at MASTER_ADDR:MASTER_PORT, exactly what
``torchrun --nnodes=WORLD_SIZE --node_rank=RANK`` does. Under torchrun the verbs simply run in place.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)

PREEMPTION_AWARE_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"  # forwarded to the workers


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _node_settings() -> tuple[int, int, str, int]:
    try:
        nnodes = int(os.environ.get("WORLD_SIZE", "1"))
        node_rank = int(os.environ.get("RANK", "0"))
        port = int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError as e:
        raise ConfigError(f"RANK, WORLD_SIZE and MASTER_PORT must be integers ({e}). HINT: set RANK to this node's "
                          "rank and WORLD_SIZE to the number of nodes, as with the original train_pixelz.") from None
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"RANK={node_rank} is not a node rank for WORLD_SIZE={nnodes} nodes. HINT: RANK counts "
                          "nodes here (0 .. WORLD_SIZE-1), not processes.")
    return nnodes, node_rank, os.environ.get("MASTER_ADDR", "127.0.0.1"), port


def _launch(fn, args: tuple, kwargs: dict, nproc_per_node: int | None = None, start_method: str = "spawn",
            max_restarts: int = 0) -> dict:
    """Run ``fn(*args, **kwargs)`` in ``nproc_per_node`` workers of this node; returns {local rank: result}.

    ``spawn`` pickles the arguments in one piece (so an optimizer still points at the model's parameters) and
    re-imports the calling script in each worker: guard it with ``if __name__ == "__main__":``.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nnodes, node_rank, addr, port = _node_settings()
    nproc = nproc_per_node or max(torch.cuda.device_count(), 1)
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=f"pixelz-{addr}-{port}",
                          rdzv_backend="static", rdzv_endpoint=f"{addr}:{port}",
                          rdzv_configs={"rank": node_rank, "timeout": 900}, max_restarts=max_restarts,
                          start_method=start_method, monitor_interval=0.5, signals_to_handle=PREEMPTION_AWARE_SIGNALS)
    logger.info("starting %d worker process(es) on node %d of %d (rendezvous %s:%d)", nproc, node_rank, nnodes,
                addr, port)
    return elastic_launch(config, fn)(*args, **kwargs)


def private_copy(objects):
    """Copies of the model, optimizer and scheduler that this worker alone owns.

    torch.multiprocessing hands tensors to spawned processes in *shared* memory: every worker would update the same
    weights. A plain pickle round trip copies them and keeps the links between the objects (the optimizer still
    holds the model's parameters, the scheduler the optimizer).
    """
    return pickle.loads(pickle.dumps(objects))


def _own_copies(args, kwargs, positional: int):
    """Replace the first ``positional`` arguments (model, optimizer[, scheduler]) by private copies."""
    args = list(args)
    own = {i: args[i] for i in range(min(positional, len(args)))}
    own.update({k: kwargs[k] for k in ("optimizer", "scheduler") if k in kwargs})
    for key, value in private_copy(own).items():
        if isinstance(key, int):
            args[key] = value
        else:
            kwargs[key] = value
    # The unpickled optimizer lost the scheduler's step-order check; torch then warns at every epoch. It is benign.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    return args, kwargs


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _in_worker(verb, positional: int, returned, args, kwargs):
    """Worker side: ``verb`` on private copies of the objects; rank 0 sends ``returned(result)`` back (a state dict or
    a result object pickles anywhere; the module may not)."""
    args, kwargs = _own_copies(args, kwargs, positional)
    result = verb(*args, **kwargs)
    return returned(result) if _is_rank0() else None


def run_per_gpu(verb, args: tuple, kwargs: dict, *, positional: int, returned, nproc_per_node: int | None = None,
                start_method: str = "spawn"):
    """``verb(*args, **kwargs)`` in one worker per local GPU of this node; rank 0's ``returned(result)``, or None.

    ``verb`` and ``returned`` must be module-level functions (they are pickled by name); the first ``positional``
    arguments (model, optimizer[, scheduler]) are copied privately into each worker.
    """
    results = _launch(_in_worker, (verb, positional, returned, args, kwargs), {}, nproc_per_node, start_method)
    return results.get(0)
