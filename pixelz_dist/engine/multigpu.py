"""``train_model_multigpu``: the seed's multi-GPU calling convention for :func:`train_model` (see
:mod:`pixelz_dist.distributed.launch` for how the workers are started)."""

from __future__ import annotations

from ..distributed.launch import run_per_gpu, under_torchrun
from .train_model import train_model


def _weights(model):
    return model.state_dict()


def train_model_multigpu(model, *args, nproc_per_node: int | None = None, start_method: str = "spawn", **kwargs):
    """:func:`train_model` on every GPU of every node, with the seed's calling convention.

    The user sets RANK = this node's rank, WORLD_SIZE = the number of nodes, MASTER_ADDR and MASTER_PORT, and calls
    this from a plain ``python`` process; under torchrun it simply trains in place.

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
    state = run_per_gpu(train_model, (model, *args), kwargs, positional=3, returned=_weights,
                        nproc_per_node=nproc_per_node, start_method=start_method)
    if state is not None:
        model.load_state_dict(state)
    return model
