"""train_model with a DataLoader the user built: sampling is theirs, the resumed position must still be exact."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from pixelz_dist import train_model
from pixelz_dist.data.sampler import ResumableBatchSampler
from pixelz_dist.data.user_loader import UserLoaderSource
from pixelz_dist.distributed.env import DistEnv
from pixelz_dist.errors import ConfigError, SnapshotError


class Indexed(Dataset):
    def __init__(self, n=30, augment=False):
        g = torch.Generator().manual_seed(4)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)
        self.augment = augment

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] + (0.1 * torch.randn(5) if self.augment else 0)  # global RNG: exact with num_workers=0
        return x, self.y[i], torch.tensor(i)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
        self.seen = []

    def forward(self, x, y, i):
        self.seen.extend(i.tolist())
        return nn.functional.mse_loss(self.net(x), y)


class StatefulShuffle(Sampler):
    """A sampler with its own state: a permutation per epoch from a counter it keeps."""

    def __init__(self, n):
        self.n, self.epochs = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        self.epochs += 1
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + self.epochs))
        return iter(order.tolist())

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state):
        self.epochs = state["epochs"]


class Unstateful(Sampler):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(range(self.n))


def train(loader_factory, prefix, n_iters, iter_size=1, **kw):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.7)
    train_model(model, opt, sched, loader_factory(), None, num_iters=n_iters, iter_size=iter_size,
                snapshot_prefix=prefix, **kw)
    return model


def assert_split_run_equals_straight(tmp_path, loader_factory, stop_at=4, total=13, iter_size=1):
    """Stop mid-epoch (30 samples / batch 4 = 8 batches per epoch), resume in a fresh model + loader, compare."""
    straight = train(loader_factory, str(tmp_path / "a"), total, iter_size)
    first = train(loader_factory, str(tmp_path / "b"), stop_at, iter_size)
    resumed = train(loader_factory, str(tmp_path / "b"), total, iter_size, load_snapshot_path="auto")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert first.seen + resumed.seen == straight.seen  # every sample exactly once, in the same order


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_dataloader_resumes_mid_epoch_exactly(tmp_path, workers):
    """DataLoader(shuffle=True) without a generator draws its order from the global RNG at the epoch's start."""
    assert_split_run_equals_straight(
        tmp_path, lambda: DataLoader(Indexed(augment=workers == 0), batch_size=4, shuffle=True, num_workers=workers))


def test_a_stateful_sampler_resumes_mid_epoch_exactly(tmp_path):
    assert_split_run_equals_straight(tmp_path, lambda: DataLoader(Indexed(), batch_size=4,
                                                                  sampler=StatefulShuffle(30)), iter_size=3)


@pytest.mark.slow
def test_torchdata_stateful_dataloader_resumes_mid_epoch_exactly(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    assert_split_run_equals_straight(
        tmp_path, lambda: StatefulDataLoader(Indexed(), batch_size=4, shuffle=True, num_workers=2), stop_at=5)


def test_our_sampler_as_a_batch_sampler(tmp_path):
    assert_split_run_equals_straight(tmp_path, lambda: DataLoader(
        Indexed(), batch_sampler=ResumableBatchSampler(30, 4, shuffle=True, seed=3, with_seeds=False)))


def test_an_unrestorable_sampler_is_refused_mid_epoch_and_restore_dataloader_false_goes_on(tmp_path):
    def factory():
        return DataLoader(Indexed(), batch_size=4, sampler=Unstateful(30))

    train(factory, str(tmp_path / "s"), 3)
    with pytest.raises(SnapshotError, match=r"3 batches into an epoch.*Unstateful has no state_dict"):
        train(factory, str(tmp_path / "s"), 6, load_snapshot_path="auto")
    model = train(factory, str(tmp_path / "s"), 6, load_snapshot_path="auto", restore_dataloader=False)
    assert model.seen[:4] == [0, 1, 2, 3]  # the next epoch from its start


def test_an_iterable_dataset_loader_without_length_gets_short_tail_windows(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(5)
            for i in range(10):
                yield torch.randn(5, generator=g), torch.randn(1, generator=g), torch.tensor(i)

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = []

    from pixelz_dist import Callback

    class Count(Callback):
        def on_after_backward(self, state):
            steps.append(len(state.model.seen))

    train_model(model, opt, None, DataLoader(Stream(), batch_size=1), None, num_epochs=2, iter_size=4,
                callbacks=[Count()])
    assert steps == [4, 8, 10, 14, 18, 20]  # windows of 4, 4 and 2 batches per epoch


def test_dataloader_arguments_that_clash_are_named():
    loader = DataLoader(Indexed(), batch_size=4)
    model = Net()
    with pytest.raises(ConfigError, match=r"shuffle=True, batch_size=8 \(the DataLoader.s is 4\)"):
        train_model(model, torch.optim.SGD(model.parameters(), lr=0.1), None, loader, 8, shuffle=True,
                    num_iters=1)


def test_distributed_needs_a_distributed_sampler():
    env = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=2)
    ds = Indexed()
    with pytest.raises(ConfigError, match="DistributedSampler"):
        UserLoaderSource(DataLoader(ds, batch_size=4, shuffle=True), env)
    ok = DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=2, rank=0))
    assert UserLoaderSource(ok, env).length == 4
