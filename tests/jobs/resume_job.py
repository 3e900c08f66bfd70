"""A training job the resume tests start as a real process (and may SIGKILL).

Usage: python resume_job.py CONFIG_JSON. The config names the data folder, the snapshot prefix, the optimizer, the
number of iterations or epochs, and optionally ``kill_at``: the iteration after which the process SIGKILLs itself
(from a callback, i.e. in the middle of training, after a snapshot and before the next one).
"""

import gc
import json
import os
import signal
import sys

import torch
from snapshot_wait import wait_until_durable

from pixelz_dist import Callback, MultiImgsDataset, train_model
from pixelz_dist.cli.demo import DEMO_FOLDERS, DemoDataset, TinySegNet


class JointDemo(torch.utils.data.Dataset):
    """The demo files through a joint v2 crop (crop-aware decoding) and, with a cache folder, the pixel cache."""

    def __init__(self, root, cache_dir):
        from torchvision.transforms import v2

        t = v2.Compose([v2.RandomResizedCrop(16, scale=(0.3, 1.0)), v2.RandomHorizontalFlip(),
                        v2.ToDtype(torch.float32, scale=True)])
        self.images = MultiImgsDataset([os.path.join(root, sub) for sub, _ in DEMO_FOLDERS], t,
                                       modes=["RGB", "L", "L"], kinds=["image", "image", "mask"], cache_dir=cache_dir)
        assert self.images._planner is not None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        rgb, hint, mask = self.images[index]
        return rgb, hint, (mask > 127).float()


class KillAt(Callback):
    def __init__(self, iteration):
        self.iteration = iteration

    def on_iteration_end(self, state):
        if state.iteration == self.iteration:
            wait_until_durable(state)
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    model = TinySegNet(width=6, dropout=0.3)
    if cfg["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    callbacks = [KillAt(cfg["kill_at"])] if cfg.get("kill_at") else []
    data = JointDemo(cfg["data"], cfg.get("cache")) if cfg.get("joint") else DemoDataset(cfg["data"])
    train_model(model, optimizer, scheduler, data, cfg.get("batch_size", 4), shuffle=True,
                snapshot_prefix=cfg["prefix"], num_iters=cfg.get("num_iters"), num_epochs=cfg.get("num_epochs"),
                iter_size=cfg["iter_size"], display_iter=2, snapshot_interval=cfg.get("interval"),
                load_snapshot_path=cfg.get("resume"), schedule_on_iter=cfg.get("schedule_on_iter", False),
                seed=cfg.get("seed", 7), num_workers=cfg["workers"], callbacks=callbacks)


if __name__ == "__main__":
    main()
    # The job is done and its records are written: skip the interpreter's garbage collections at exit (over 300,000
    # objects of torch's, about 1.3 s a process). Not on an error: that way out stays the ordinary one.
    gc.freeze()
