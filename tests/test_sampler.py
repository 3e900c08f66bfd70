"""The order is a pure function of (seed, epoch); the position is a count of global samples; shards tile the order."""

import numpy as np
import pytest

from pixelz_dist.data.sampler import BatchKey, ResumableBatchSampler, mix_seed


def flat(sampler):
    return [i for key in sampler for i in key.indices]


def test_order_is_a_pure_function_of_seed_and_epoch():
    a = ResumableBatchSampler(100, 8, shuffle=True, seed=5)
    b = ResumableBatchSampler(100, 8, shuffle=True, seed=5)
    b.order(3)  # asking for another epoch first changes nothing
    assert np.array_equal(a.order(0), b.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), ResumableBatchSampler(100, 8, shuffle=True, seed=6).order(0))
    assert sorted(a.order(0).tolist()) == list(range(100))
    assert ResumableBatchSampler(10, 3).order(4).tolist() == list(range(10))


def test_batches_and_lengths_with_and_without_drop_last():
    s = ResumableBatchSampler(10, 4)
    assert [k.indices for k in s] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(s) == 3 and s.batches_per_epoch() == 3
    s = ResumableBatchSampler(10, 4, drop_last=True)
    assert [k.indices for k in s] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(s) == 2


def test_start_position_skips_by_index_and_matches_the_uninterrupted_tail():
    full = ResumableBatchSampler(50, 4, shuffle=True, seed=1)
    full.set_epoch(2)
    everything = list(full)
    tail = ResumableBatchSampler(50, 4, shuffle=True, seed=1)
    tail.set_epoch(2, start=20)
    assert list(tail) == everything[5:]  # same indices and the same per-batch seeds
    assert len(tail) == len(everything) - 5
    assert tail.position_after(len(tail)) == 50
    assert tail.position_after(1) == 24


def test_resume_with_another_batch_size_keeps_the_sample_position():
    a = ResumableBatchSampler(30, 4, shuffle=True, seed=9)
    a.set_epoch(0)
    seen = flat(a)[:12]
    b = ResumableBatchSampler(30, 6, shuffle=True, seed=9)
    b.set_epoch(0, start=12)
    assert seen + flat(b) == a.order(0).tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_shards_tile_the_global_order(world):
    shards = [ResumableBatchSampler(24, 4, shuffle=True, seed=3, rank=r, world_size=world) for r in range(world)]
    for s in shards:
        s.set_epoch(1)
    per_rank = [list(s) for s in shards]
    rebuilt = [i for step in zip(*per_rank) for key in step for i in key.indices]
    assert rebuilt == shards[0].order(1).tolist()


def test_batch_keys_pickle_and_seeds_differ_per_batch():
    import pickle

    s = ResumableBatchSampler(16, 4, shuffle=True)
    keys = list(s)
    assert pickle.loads(pickle.dumps(keys[0])) == keys[0]
    assert isinstance(keys[0], BatchKey)
    assert len({k.rng_seed for k in keys}) == len(keys)
    assert mix_seed(1, 2, 3) != mix_seed(1, 3, 2)
    assert 0 <= mix_seed(2**70, -5) < 2**63


def test_order_digest_identifies_positions():
    s = ResumableBatchSampler(20, 4, shuffle=True, seed=2)
    s.set_epoch(0)
    assert s.order_digest(0, 8) == ResumableBatchSampler(20, 2, shuffle=True, seed=2).order_digest(0, 8)
    assert s.order_digest(0, 8) != s.order_digest(8, 16)


def test_set_epoch_rejects_positions_outside_the_epoch():
    with pytest.raises(ValueError, match="outside the epoch"):
        ResumableBatchSampler(10, 2).set_epoch(0, start=11)


def test_a_short_last_global_batch_is_split_evenly_and_padded_only_when_smaller_than_the_world():
    def tail(n, world):
        out = []
        for r in range(world):
            s = ResumableBatchSampler(n, 4, rank=r, world_size=world)
            out.append(list(s)[-1].indices)
        return out

    assert tail(11, 2) == [[8, 9], [10]]          # 3 left: 2 + 1
    assert tail(9, 2) == [[8], [8]]               # 1 left, 2 ranks: rank 1 repeats it
    assert tail(14, 3) == [[12], [13], [12]]
    seeds = [list(ResumableBatchSampler(16, 4, rank=r, world_size=2))[0].rng_seed for r in range(2)]
    assert seeds[0] != seeds[1]  # ranks draw different augmentations


@pytest.mark.parametrize("world, start, drop_last", [(1, 0, False), (1, 4 * 70 + 8, False), (2, 2 * 3 * 63, True),
                                                     (3, 3 * 3 * 64 + 3, False)])
def test_batches_across_conversion_blocks_match_the_order(world, start, drop_last):
    """The order is turned into Python ints BLOCK batches at a time: batches on both sides of a block's edge, a
    start inside a block and a short tail must be exactly the slices of the epoch's order, with the same seeds."""
    n = 1000
    batch = 4 if world == 1 else 3
    shards = [ResumableBatchSampler(n, batch, shuffle=True, seed=7, rank=r, world_size=world, drop_last=drop_last)
              for r in range(world)]
    assert n // (batch * world) > ResumableBatchSampler.BLOCK  # more than one block
    order = shards[0].order(2).tolist()
    gb = batch * world
    for s in shards:
        s.set_epoch(2, start)
        keys = list(s)
        positions = list(range(start, start + len(s) * gb, gb))
        assert len(keys) == len(positions) == len(s)
        for key, p in zip(keys, positions):
            offset, part = s.shard(order[p:p + gb])
            assert key.indices == part
            assert key.rng_seed == mix_seed(7, 2, p + offset)
    plain = ResumableBatchSampler(n, batch, shuffle=True, seed=7, rank=world - 1, world_size=world,
                                  drop_last=drop_last, with_seeds=False)
    plain.set_epoch(2, start)
    assert list(plain) == [k.indices for k in keys]
