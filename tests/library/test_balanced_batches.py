"""BalancedBatchSampler: ceil(n/B) batches that differ by at most one, every sample once, exact mid-epoch resume."""
import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from d3p.sampler import BalancedBatchSampler, PrunedDistributedSampler, balanced_batch_sizes
from util.item_seeding import STREAM_TRAIN, ItemSeedSampler


@pytest.mark.parametrize("n,b", [(450, 64), (448, 64), (1, 64), (64, 64), (65, 64), (129, 32), (7, 3), (1000, 1)])
def test_sizes_balanced_and_cover(n, b):
    sizes = balanced_batch_sizes(n, b)
    assert len(sizes) == -(-n // b)
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= b
    assert sizes == sorted(sizes, reverse=True)


def test_sizes_of_the_runt_case_and_edges():
    assert balanced_batch_sizes(450, 64) == [57, 57] + [56] * 6  # not 7 x 64 + one batch of 2
    assert balanced_batch_sizes(0, 64) == []
    with pytest.raises(ValueError, match="batch_size"):
        balanced_batch_sizes(10, 0)


def _pruned(n, world, rank, kept, epoch=3, seed=7):
    s = PrunedDistributedSampler(n, world, rank, seed=seed)
    s.set_indices(kept)
    s.set_epoch(epoch)
    return s


KEPT = np.sort(np.random.default_rng(0).choice(300, 203, replace=False))  # 203 kept of 300


@pytest.mark.parametrize("world", [1, 2])
def test_every_sample_once_in_balanced_batches(world):
    seen = []
    for rank in range(world):
        s = _pruned(300, world, rank, KEPT)
        batches = list(BalancedBatchSampler(s, 16))
        assert len(batches) == len(BalancedBatchSampler(s, 16)) == -(-len(s) // 16)
        assert [len(x) for x in batches] == balanced_batch_sizes(len(s), 16)
        assert sum(batches, []) == list(s)  # the sampler's order, unchanged
        seen += sum(batches, [])
    assert set(seen) == set(KEPT.tolist()) and len(seen) == 203 + (-203) % world  # padding only


@pytest.mark.parametrize("seeded", [False, True])
def test_resume_at_every_position_gives_the_remaining_batches(seeded):
    """Two simulated ranks: interrupting after any number of local samples and resuming yields the uninterrupted
    epoch's batches from there on (the one cut at the skip point continues as its rest)."""
    batch = 16
    for rank in range(2):
        def make():
            base = _pruned(300, 2, rank, KEPT)
            return base, (ItemSeedSampler(base, seed=5, rank=rank, stream=STREAM_TRAIN) if seeded else base)
        base, items = make()
        full = list(BalancedBatchSampler(items, batch))
        ends = np.cumsum([len(x) for x in full])
        flat = sum(full, [])
        for done in range(len(flat) + 1):
            base, items = make()
            base.skip(done)
            assert items.skipped == done
            resumed = list(BalancedBatchSampler(items, batch))
            assert len(BalancedBatchSampler(items, batch)) == len(resumed)
            first = int(np.searchsorted(ends, done, side="right"))  # the batch that holds position `done`
            expected = full[first:]
            if first < len(full) and done > (ends[first - 1] if first else 0):
                expected = [flat[done : ends[first]]] + full[first + 1 :]
            assert resumed == expected, (rank, done)
            assert sum(resumed, []) == flat[done:]  # also the item seeds: the same positions
            if done in set(ends.tolist()) | {0}:  # resuming at a batch boundary: the same whole batches
                assert resumed == full[len(full) - len(resumed):]


def test_resume_through_resume_epoch_on_another_world_size():
    """resume_epoch on another world size: skipped counts the positions done before it, the rest is balanced."""
    s = PrunedDistributedSampler(300, 1, 0, seed=7)
    s.set_indices(KEPT)
    s.set_epoch(3)
    s.set_replicas(2, 1)
    s.set_epoch(3)
    s.resume_epoch(41)  # odd: the remaining positions are split anew
    b = BalancedBatchSampler(s, 16)
    got = list(b)
    assert s.skipped == 20 and len(s) == 81  # 41 // 2 positions before, (203 - 41) / 2 rounded up after
    assert sum(got, []) == list(s) and len(got) == len(b)
    # the whole epoch's sizes (101 = 20 + 81 in 7 batches: 15, 15, 15, 14 x 4); position 20 cuts the second batch
    assert [len(x) for x in got] == [10, 15, 14, 14, 14, 14]


def test_drop_last_is_torchs_batch_sampler():
    for n in (450, 448, 63, 64):
        s = _pruned(500, 1, 0, np.arange(n))
        ours = BalancedBatchSampler(s, 64, drop_last=True)
        torchs = BatchSampler(s, 64, drop_last=True)
        assert list(ours) == list(torchs) and len(ours) == len(torchs)


def test_as_a_dataloaders_batch_sampler():
    s = _pruned(300, 1, 0, KEPT)
    data = torch.arange(300)
    loader = DataLoader(data, batch_sampler=BalancedBatchSampler(s, 64), num_workers=0)
    got = [x.tolist() for x in loader]
    assert [len(x) for x in got] == [51, 51, 51, 50] and sum(got, []) == list(s)


def test_pruner_epoch_trains_balanced_batches_and_ignores_drop_last():
    """pruner.epoch's loader: 450 kept of 900 in batches of 64 -> 2 x 57 + 6 x 56 (no batch of 2), all trained,
    also when the user's loader says drop_last=True."""
    import d3p
    data = torch.utils.data.TensorDataset(torch.randn(900, 4), torch.zeros(900, dtype=torch.long))
    pruner = d3p.DataPruner(900, "random", epochs=2, prune_ratio=0.5, seed=1, loss_fn=d3p.per_sample_cross_entropy)
    for drop_last in (False, True):
        loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=drop_last)
        sizes = []
        for x, y in pruner.epoch(loader, 0):
            sizes.append(len(x))
            pruner.loss(torch.zeros(len(x), 3), y)  # one loss per batch, as a training loop would
        assert sizes == [57, 57] + [56] * 6
