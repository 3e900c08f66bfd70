"""Builds a MultiImgsDataset (under torchrun, or as one of the processes of a process group the script makes itself),
records its table and trains a few iterations, for tests/test_listing_once.py.

Config keys (JSON): dirs, out (folder for rank<N>.json), prefix (snapshots), shared (shared_listing, default true),
user_group (init_process_group, env://, before the dataset is built), workers (DataLoader workers, default 0).
"""

import gc
import json
import os
import sys

import torch
from torchvision.transforms import v2

from pixelz_dist import MultiImgsDataset, train_model
from slow_data import TwoFolderNet


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if cfg.get("user_group"):
        torch.distributed.init_process_group("gloo")
    own = {} if cfg.get("shared", True) else {"shared_listing": False}  # the default is what is tested
    dataset = MultiImgsDataset(cfg["dirs"], v2.ToDtype(torch.float32, scale=True), modes=["RGB", "L"], **own)
    with open(os.path.join(cfg["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"stems": list(dataset.stems), "files": [list(column) for column in dataset.files],
                   "types": [type(dataset.stems).__name__] + [type(column).__name__ for column in dataset.files]}, f)
    model = TwoFolderNet()
    train_model(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), None, dataset, batch_size=4,
                shuffle=True, num_iters=4, snapshot_prefix=cfg["prefix"], num_workers=cfg.get("workers", 0), seed=5)
    if cfg.get("user_group"):
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # The job is done and its records are written: skip the interpreter's garbage collections at exit (over 300,000
    # objects of torch's, about 1.3 s a process). Not on an error: that way out stays the ordinary one.
    gc.freeze()
