"""A training job whose snapshot write of one iteration can be held inside its real atomic write, so that a test can
kill the process, or time the other ranks, while that write is under way in the background.

Usage: python async_job.py CONFIG_JSON (also under torchrun). Config: ``prefix``, ``out`` (a folder for the records
below), ``num_iters``, ``interval``, ``keep_last``, ``resume``, ``dist_timeout``, and the gate: ``gate`` ("write":
half the bytes are in the temporary file; "fsync": all of them, not yet flushed nor renamed), ``gate_at`` (the
snapshot iteration held, or a list of them), ``hold`` (seconds; default: until killed).

Records in ``out``: ``progress<rank>`` (the last iteration ended), ``held<iteration>`` (the write is being held),
``snapshots<rank>`` (one line per on_snapshot: the iteration the hook ran at, the path, whether the file existed).
"""

import io
import json
import os
import sys
import time

import torch
from torch import nn

import pixelz_dist.checkpoint.checkpointer as checkpointer
from pixelz_dist import Callback, train_model
from pixelz_dist.fileio import atomic_write


class Line(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 1)

    def forward(self, x, y):
        return ((self.layer(x) - y) ** 2).mean()


class Record(Callback):
    def __init__(self, out, rank):
        self.out, self.rank = out, rank

    def on_iteration_end(self, state):
        with open(os.path.join(self.out, f"progress{self.rank}.tmp"), "w") as f:
            f.write(str(state.iteration))
        os.replace(os.path.join(self.out, f"progress{self.rank}.tmp"), os.path.join(self.out, f"progress{self.rank}"))

    def on_snapshot(self, state, path):
        with open(os.path.join(self.out, f"snapshots{self.rank}"), "a") as f:
            f.write(json.dumps([state.iteration, path, os.path.exists(path)]) + "\n")


def hold_write(cfg):
    """Replace the checkpointer's save with one that holds the write of ``gate_at`` at the gate (the rest as is)."""
    real_save = checkpointer.save_snapshot
    gated = cfg["gate_at"] if isinstance(cfg["gate_at"], list) else [cfg["gate_at"]]

    def save_snapshot(snapshot, path):
        iteration = next((it for it in gated if path.endswith(f"_iter_{it}.pt")), None)
        if iteration is None:
            return real_save(snapshot, path)
        held = os.path.join(cfg["out"], f"held{iteration}")
        buffer = io.BytesIO()
        torch.save(snapshot, buffer)
        data = buffer.getvalue()
        with atomic_write(path) as f:  # the library's own temporary file, fsync and rename
            f.write(data if cfg["gate"] == "fsync" else data[: len(data) // 2])
            f.flush()
            open(held, "w").close()
            time.sleep(cfg.get("hold", 3600))
            if cfg["gate"] == "write":
                f.write(data[len(data) // 2:])

    checkpointer.save_snapshot = save_snapshot


def main():
    cfg = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if cfg.get("gate"):
        hold_write(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=g))
    model = Line()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_model(model, optimizer, None, data, 4, shuffle=True, snapshot_prefix=cfg["prefix"],
                num_iters=cfg["num_iters"], snapshot_interval=cfg["interval"], keep_last=cfg.get("keep_last"),
                load_snapshot_path=cfg.get("resume"), num_workers=0, display_iter=1000,
                dist_timeout=cfg.get("dist_timeout"), callbacks=[Record(cfg["out"], rank)])


if __name__ == "__main__":
    main()
