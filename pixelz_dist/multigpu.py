"""The seed's multi-GPU calling convention, on top of torch's own elastic launcher (no home-made spawner).

The user sets RANK = this node's rank, WORLD_SIZE = the number of nodes, MASTER_ADDR and MASTER_PORT, then calls
``train_model_multigpu(...)`` from a plain ``python`` process. One worker process per local GPU (or
``nproc_per_node`` CPU processes with gloo) is started through ``torch.distributed.launcher.elastic_launch`` with a
static rendezvous at MASTER_ADDR:MASTER_PORT, exactly what ``torchrun --nnodes=WORLD_SIZE --node_rank=RANK`` does.
Under torchrun these functions simply run in place.
"""

from __future__ import annotations

import os
import pickle
import warnings

import torch

from .errors import ConfigError
from .log import logger
from .trainer import train_model

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


def launch_on_this_node(fn, args: tuple, kwargs: dict, nproc_per_node: int | None = None,
                        start_method: str = "spawn", max_restarts: int = 0) -> dict:
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


def _train_in_worker(args, kwargs):
    """Worker side: train, and send rank 0's weights back (a state dict pickles anywhere; the module may not)."""
    args, kwargs = _own_copies(args, kwargs, 3)
    model = train_model(*args, **kwargs)
    return model.state_dict() if _is_rank0() else None


def _find_lr_in_worker(args, kwargs):
    """Worker side of find_lr_multigpu: rank 0 sends the result back (numpy arrays and plain values)."""
    from .lr_finder import find_lr

    args, kwargs = _own_copies(args, kwargs, 2)
    model = find_lr(*args, **kwargs)
    return model.lr_finder_result if _is_rank0() else None


def train_model_multigpu(model, *args, nproc_per_node: int | None = None, start_method: str = "spawn", **kwargs):
    """:func:`train_model` on every GPU of every node, with the seed's calling convention.

    Args:
        model, *args, **kwargs: exactly as :func:`train_model`.
        nproc_per_node: worker processes on this node (default: one per GPU; one CPU process without GPUs).
        start_method: how the workers start (``spawn``; ``fork`` only on CPU-only machines).

    Returns:
        ``model`` itself, holding the trained weights (on node 0; other nodes return their own ``model`` unchanged).

    Example:
        >>> os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="35003")
        >>> model = train_model_multigpu(model, optimizer, scheduler, dataset, 6, num_epochs=5)  # doctest: +SKIP
    """
    if under_torchrun():
        return train_model(model, *args, **kwargs)
    results = launch_on_this_node(_train_in_worker, ((model, *args), kwargs), {}, nproc_per_node, start_method)
    state = results.get(0)
    if state is not None:
        model.load_state_dict(state)
    return model


def find_lr_multigpu(model, *args, nproc_per_node: int | None = None, start_method: str = "spawn", **kwargs):
    """:func:`~pixelz_dist.lr_finder.find_lr` on every GPU of every node, with the seed's calling convention.

    Same environment as :func:`train_model_multigpu`. Returns ``model`` unchanged (the finder leaves weights as they
    were) with the result attached as ``model.lr_finder_result`` on node 0.
    """
    if under_torchrun():
        from .lr_finder import find_lr

        return find_lr(model, *args, **kwargs)
    results = launch_on_this_node(_find_lr_in_worker, ((model, *args), kwargs), {}, nproc_per_node, start_method)
    if results.get(0) is not None:
        model.lr_finder_result = results[0]
    return model
