"""The seed's calling convention: a plain python process sets RANK/WORLD_SIZE/MASTER_* and calls
train_model_multigpu, which starts the worker processes itself. Writes the returned model's weights."""

import gc
import json
import os
import sys

import torch

import dist_job
from pixelz_dist import train_model_multigpu

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg["port"]))
    torch.manual_seed(1234)
    model = dist_job.MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.8)
    returned = train_model_multigpu(model, optimizer, scheduler, dist_job.IndexedData(48), 2, shuffle=True,
                                    snapshot_prefix=cfg["prefix"], num_iters=6, iter_size=2, seed=5, num_workers=0,
                                    nproc_per_node=2)
    assert returned is model
    torch.save(model.state_dict(), cfg["out"])
    # The job is done and its records are written: skip the interpreter's garbage collections at exit (over 300,000
    # objects of torch's, about 1.3 s a process). Not on an error: that way out stays the ordinary one.
    gc.freeze()
