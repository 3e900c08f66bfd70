"""find_lr in one process, under torchrun, or through find_lr_multigpu (the seed's convention); rank 0 writes the
result file. Usage: python|torchrun find_lr_job.py CONFIG_JSON (keys: mode, results ({method: result file}, the
methods run in that order, each from a fresh model), batch_size, port)."""

import gc
import json
import os
import sys

import torch

import dist_job
from pixelz_dist import find_lr, find_lr_multigpu


def build():
    torch.manual_seed(1234)
    model = dist_job.MLP()
    return model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    for method, result in cfg["results"].items():
        model, optimizer = build()
        kwargs = dict(shuffle=True, iter_size=2, min_lr=1e-4, max_lr=1.0, iter_per_run=4, num_runs=5,
                      result_file=result, method=method, num_iters=12, num_workers=0)
        if cfg["mode"] == "multigpu":
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]))
            returned = find_lr_multigpu(model, optimizer, dist_job.IndexedData(48), cfg["batch_size"],
                                        nproc_per_node=2, **kwargs)
            assert returned.lr_finder_result.lrs is not None
        else:
            find_lr(model, optimizer, dist_job.IndexedData(48), cfg["batch_size"], **kwargs)
    # The job is done and its records are written: skip the interpreter's garbage collections at exit (over 300,000
    # objects of torch's, about 1.3 s a process). Not on an error: that way out stays the ordinary one.
    gc.freeze()
