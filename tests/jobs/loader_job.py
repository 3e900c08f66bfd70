"""A training job over a DataLoader the user built, whose ranks read different records; started by torchrun (or
plain python) with a JSON config. Each rank writes ``out/rank<RANK>.json``: the records it trained on, the
optimizer steps it made and the epochs it ended.

Config keys: prefix, resume, num_iters | num_epochs, out, interval (snapshot interval), batch_size, iter_size,
workers, lengths (records per rank; default 8 each), kill_at (SIGKILL every rank at the end of that iteration,
before a snapshot of it), train_kwargs (more train_model arguments), runs (a list of configs
that update this one, each trained in turn in the same processes; ``tag`` names each one's output file
``rank<RANK><tag>.json``), data:

- ``"stream"``: an IterableDataset without a length, read through torchdata's StatefulDataLoader (default);
- ``"stream_len"``: the same with ``__len__`` (this rank's shard size);
- ``"plain_stream"`` / ``"plain_stream_len"``: the same through torch's DataLoader;
- ``"map"``: a map-style dataset through torch's DataLoader, batches of a DistributedSampler's shard in an order of
  the batch sampler's own (a generator seeded per rank: its state differs per rank);
- ``"batch_sampler"``: a map-style dataset with a batch sampler of its own over a DistributedSampler that yields a
  different number of batches per rank (``lengths``);
- ``"sampler"``: a map-style dataset through ``DataLoader(sampler=DistributedSampler(shuffle=True))``, the usual
  way (the order of each epoch depends on the ``set_epoch`` call train_model makes).

At every snapshot each rank also writes the records it trained on so far to ``out/rank<RANK>_at<ITERATION>.json``
(what a killed run had trained on up to the snapshot a resume starts from).
"""

import gc
import json
import os
import signal
import sys

import torch
from snapshot_wait import wait_until_durable
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from dist_job import MLP
from pixelz_dist import Callback, train_model


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def record(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, generator=g), torch.randn(1, generator=g), torch.tensor(i, dtype=torch.float64)


class Shard(IterableDataset):
    """This rank's records, ids ``1000 * rank + i``, read like a file from an offset (each rank reads its own file):
    the offset is the dataset's state, which StatefulDataLoader saves and loads."""

    def __init__(self, n):
        self.first = 1000 * rank()
        self.end = self.first + n
        self.offset, self.loaded = self.first, False

    def __iter__(self):
        if not self.loaded:  # a new epoch starts at the beginning; a loaded state where it was
            self.offset = self.first
        self.loaded = False
        while self.offset < self.end:
            self.offset += 1
            yield record(self.offset - 1)

    def state_dict(self):
        return {"offset": self.offset}

    def load_state_dict(self, state):
        self.offset, self.loaded = state["offset"], True


class SizedShard(Shard):
    def __len__(self):
        return self.end - self.first


class Indexed(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return record(i)


class ShuffledBatches(Sampler):
    """Batches of a DistributedSampler's indices, in an order drawn from a generator of its own, seeded per rank;
    the generator's state is the sampler's state (as a bucketing batch sampler might keep)."""

    def __init__(self, sampler, batch_size, seed):
        self.sampler, self.batch_size = sampler, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        indices = list(self.sampler)
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        for k in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[k]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class UnevenBatches(Sampler):
    """Batches of the first ``records`` of a DistributedSampler's indices (this rank's entry of ``lengths``)."""

    def __init__(self, sampler, batch_size, records):
        self.sampler, self.batch_size, self.records = sampler, batch_size, records

    def __len__(self):
        return -(-self.records // self.batch_size)

    def __iter__(self):
        indices = list(self.sampler)[:self.records]
        for i in range(0, len(indices), self.batch_size):
            yield indices[i:i + self.batch_size]


class Probe(Callback):
    def __init__(self, cfg):
        self.cfg = cfg
        self.steps = 0
        self.epochs_ended = []
        self.snapshots = []
        self.seen_at = {}

    def on_iteration_end(self, state):
        self.steps += 1
        self.seen_at[state.iteration] = list(state.model.seen)  # a background snapshot's hook runs a few later
        if self.cfg.get("kill_at") == state.iteration:
            wait_until_durable(state)
            self.record(state.newest_snapshot[1])  # its on_snapshot would come at a later iteration
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_end(self, state):
        self.epochs_ended.append(state.iteration)

    def on_snapshot(self, state, path):
        self.snapshots.append(state.last_snapshot_iteration)
        self.record(state.last_snapshot_iteration)

    def record(self, iteration):
        if self.cfg.get("out"):
            with open(os.path.join(self.cfg["out"], f"rank{rank()}_at{iteration}.json"), "w") as f:
                json.dump(self.seen_at[iteration], f)


def make_loader(cfg):
    data, batch = cfg.get("data", "stream"), cfg.get("batch_size", 1)
    n = cfg.get("lengths", [8] * world())[rank()]
    workers = cfg.get("workers", 0)
    if data.startswith(("stream", "plain_stream")):
        from torchdata.stateful_dataloader import StatefulDataLoader

        cls = DataLoader if data.startswith("plain") else StatefulDataLoader
        return cls((SizedShard if data.endswith("_len") else Shard)(n), batch_size=batch, num_workers=workers)
    if data == "map":
        dataset = Indexed(16)
        shard = DistributedSampler(dataset, world(), rank(), shuffle=True, seed=3)
        sampler = ShuffledBatches(shard, batch, seed=7 + rank())
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    if data == "sampler":
        dataset = Indexed(16)
        return DataLoader(dataset, batch_size=batch, num_workers=workers,
                          sampler=DistributedSampler(dataset, world(), rank(), shuffle=True, seed=3))
    if data == "batch_sampler":
        dataset = Indexed(40)
        shard = DistributedSampler(dataset, world(), rank(), shuffle=False)
        return DataLoader(dataset, batch_sampler=UnevenBatches(shard, batch, n))
    raise ValueError(data)


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    for run in cfg.pop("runs", [{}]):
        train({**cfg, **run})


def train(cfg):
    torch.manual_seed(0)
    model = MLP()  # it records the ids of the records it trains on
    torch.manual_seed(100 + rank())  # as a user who seeds each process differently
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    probe = Probe(cfg)
    train_model(model, optimizer, scheduler, make_loader(cfg), None, snapshot_prefix=cfg.get("prefix"),
                num_iters=cfg.get("num_iters"), num_epochs=cfg.get("num_epochs"),
                iter_size=cfg.get("iter_size", 1), display_iter=cfg.get("display_iter", 100),
                snapshot_interval=cfg.get("interval"), load_snapshot_path=cfg.get("resume"),
                callbacks=[probe], dist_timeout=60, **cfg.get("train_kwargs", {}))
    if cfg.get("out"):
        with open(os.path.join(cfg["out"], f"rank{rank()}{cfg.get('tag', '')}.json"), "w") as f:
            json.dump({"seen": model.seen, "steps": probe.steps, "epochs_ended": probe.epochs_ended,
                       "snapshots": probe.snapshots, "lr": optimizer.param_groups[0]["lr"]}, f)


if __name__ == "__main__":
    main()
    # The job is done and its records are written: skip the interpreter's garbage collections at exit (over 300,000
    # objects of torch's, about 1.3 s a process). Not on an error: that way out stays the ordinary one.
    gc.freeze()
