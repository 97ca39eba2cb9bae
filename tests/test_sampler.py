import numpy as np
import pytest

from d3p.sampler import PrunedDistributedSampler


def _ranks(n, world, kept, epoch, seed=0):
    out = []
    for r in range(world):
        s = PrunedDistributedSampler(n, world, r, seed=seed)
        s.set_indices(kept)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_equal_length_cover_and_no_pruned_index(world):
    n = 1000
    rng = np.random.default_rng(0)
    kept = np.sort(rng.choice(n, 613, replace=False))  # 613 is prime: never divisible by world > 1
    per_rank = _ranks(n, world, kept, epoch=5)
    lengths = {len(x) for x in per_rank}
    assert lengths == {-(-613 // world)}
    union = set().union(*map(set, per_rank))
    assert union == set(kept.tolist())
    assert all(i in set(kept.tolist()) for x in per_rank for i in x)
    # padding repeats at most world-1 samples
    total = sum(len(x) for x in per_rank)
    assert total - 613 == (-613) % world


def test_shuffle_changes_with_epoch_not_rank():
    n, kept = 500, np.arange(0, 500, 2)
    e1 = _ranks(n, 2, kept, epoch=1)
    e2 = _ranks(n, 2, kept, epoch=2)
    assert e1[0] != e2[0]
    # the same global order on every rank: a rank's share is a stride of one permutation
    s = PrunedDistributedSampler(n, 1, 0)
    s.set_indices(kept)
    s.set_epoch(1)
    full = list(s)
    assert e1[0] == full[0::2] and e1[1] == full[1::2]
    # reproducible
    assert _ranks(n, 2, kept, epoch=1) == e1


def test_set_indices_validation():
    s = PrunedDistributedSampler(10, 2, 1)
    with pytest.raises(ValueError, match="empty"):
        s.set_indices(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        s.set_indices(np.array([3, 10]))
    with pytest.raises(ValueError, match="rank"):
        PrunedDistributedSampler(10, 2, 2)
