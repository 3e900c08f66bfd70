"""Augmentation randomness is seeded per batch: identical across resume and whatever num_workers is."""

import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from pixelz_dist import train_model
from pixelz_dist.data.sampler import BatchKey
from pixelz_dist.data.seeding import SeededDataset, draws_no_random_numbers


class NoisyDataset(Dataset):
    """Draws from all three global RNGs, like real augmentation pipelines do."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        jitter = torch.randn(6) * 0.1 + float(np.random.uniform(-0.1, 0.1)) + random.uniform(-0.1, 0.1)
        return self.x[i] + jitter, self.y[i]


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))

    def forward(self, x, y):
        return nn.functional.mse_loss(self.net(x), y)


def train(workers, iter_size=1):
    torch.manual_seed(0)
    model = DropoutNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_model(model, opt, None, NoisyDataset(), 4, shuffle=True, num_epochs=2, iter_size=iter_size,
                num_workers=workers, display_iter=100)
    return model.state_dict()


def test_zero_one_and_two_workers_give_identical_weights():
    ref = train(0, iter_size=2)
    for workers in (1, 2):
        other = train(workers, iter_size=2)
        for k in ref:
            assert torch.equal(ref[k], other[k]), f"{k} differs with {workers} workers"


def test_a_batch_gets_the_same_augmentation_in_any_process_and_the_main_rngs_are_untouched():
    ds = SeededDataset(NoisyDataset())
    key = BatchKey(rng_seed=1234, indices=[0, 1, 2])
    torch.manual_seed(5)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = ds.__getitems__(key)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    second = ds.__getitems__(key)
    for (a, _), (b, _) in zip(first, second):
        assert torch.equal(a, b)
    other = ds.__getitems__(BatchKey(rng_seed=99, indices=[0, 1, 2]))
    assert not torch.equal(first[0][0], other[0][0])


def test_seeding_is_skipped_for_tensor_datasets_only():
    assert draws_no_random_numbers(TensorDataset(torch.zeros(3)))
    assert not draws_no_random_numbers(NoisyDataset())
