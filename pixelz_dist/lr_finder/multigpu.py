"""``find_lr_multigpu``: the seed's multi-GPU calling convention for :func:`~pixelz_dist.lr_finder.search.find_lr`
(see :mod:`pixelz_dist.distributed.launch` for how the workers are started)."""

from __future__ import annotations

from ..distributed.launch import run_per_gpu, under_torchrun
from .search import find_lr


def _result(model):
    return model.lr_finder_result  # numpy arrays and plain values: it pickles back to the launching process


def find_lr_multigpu(model, *args, nproc_per_node: int | None = None, start_method: str = "spawn", **kwargs):
    """:func:`find_lr` on every GPU of every node, with the seed's calling convention (the environment of
    :func:`~pixelz_dist.engine.multigpu.train_model_multigpu`).

    Returns ``model`` unchanged (the finder leaves weights as they were) with the result attached as
    ``model.lr_finder_result`` on node 0.
    """
    if under_torchrun():
        return find_lr(model, *args, **kwargs)
    result = run_per_gpu(find_lr, (model, *args), kwargs, positional=2, returned=_result,
                         nproc_per_node=nproc_per_node, start_method=start_method)
    if result is not None:
        model.lr_finder_result = result
    return model
