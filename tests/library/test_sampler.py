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


def _samplers(n, world, kept, epoch):
    out = []
    for r in range(world):
        s = PrunedDistributedSampler(n, world, r, seed=3)
        s.set_indices(kept)
        s.set_epoch(epoch)
        out.append(s)
    return out


@pytest.mark.parametrize("before,after,local_done", [(2, 1, 5), (1, 2, 7), (3, 2, 4), (2, 3, 11), (4, 4, 6),
                                                     (3, 5, 0), (2, 1, 51)])
def test_resume_on_another_world_size_trains_every_kept_sample_once(before, after, local_done):
    """Preempted after `local_done` samples per rank on `before` ranks, resumed on `after` ranks: what the
    old ranks trained plus what the new ranks train is the kept set, each sample once (padding aside); the
    same world size gives exactly the uninterrupted lists' remainders (skip)."""
    n = 200
    kept = np.sort(np.random.default_rng(1).choice(n, 101, replace=False))
    old = _samplers(n, before, kept, epoch=4)
    trained = [i for s in old for i in list(s)[:local_done]]
    done = old[0].samples_done(local_done)
    padded = -(-101 // before) * before  # the old ranks' lists, padding included: it was trained, it counts
    assert done == min(padded, local_done * before) and all(s.samples_done(local_done) == done for s in old)
    new = _samplers(n, after, kept, epoch=4)
    for s in new:
        s.resume_epoch(done)
    rest = [list(s) for s in new]
    assert len({len(x) for x in rest}) == 1, "ranks must get the same number of samples"
    both = trained + [i for x in rest for i in x]
    assert set(both) == set(kept.tolist())
    padding_before = max(0, local_done * before - 101)
    assert len(both) - 101 == padding_before + (-(101 - done)) % after  # nothing twice but the padding
    # the whole epoch's trained count (the ledger's samples_trained) adds both parts
    assert new[0].total_size == done + len(rest[0]) * after
    if before == after:  # the uninterrupted lists, cut after local_done: positions and padding unchanged
        assert rest == [list(s)[local_done:] for s in _samplers(n, after, kept, epoch=4)]
        assert all(s.skipped == local_done for s in new)


def test_samples_done_counts_across_a_second_resume():
    """Preempted twice in one epoch (2 ranks, then 1 rank): the second record continues the first."""
    n, kept = 50, np.arange(50)
    (a, b) = _samplers(n, 2, kept, epoch=0)
    done = a.samples_done(7)  # 14
    (c,) = _samplers(n, 1, kept, epoch=0)
    c.resume_epoch(done)
    assert c.samples_done(10) == 24 and len(c) == 36
    (d,) = _samplers(n, 1, kept, epoch=0)
    d.resume_epoch(c.samples_done(10))
    assert list(d) == list(c)[10:]


def test_a_stop_after_the_whole_padded_list_resumes_with_the_same_total():
    """9 kept on 2 ranks: each rank's list is 5 long (one position of padding). Stopped after the whole list (a stop
    in the forward-only pass, after training), the resume on 2 ranks skips everything and counts 10 trained, as
    the uninterrupted epoch does (the ledger's samples_trained); before, the padding was dropped (9)."""
    kept = np.arange(9)
    straight = _samplers(20, 2, kept, epoch=1)
    done = straight[0].samples_done(len(straight[0]))
    assert done == 10 == straight[0].total_size
    resumed = _samplers(20, 2, kept, epoch=1)
    for s in resumed:
        s.resume_epoch(done)
    assert [len(s) for s in resumed] == [0, 0] and all(s.total_size == 10 for s in resumed)
    assert all(s.samples_done(0) == 10 for s in resumed)
    (one,) = _samplers(20, 1, kept, epoch=1)  # on 1 rank: nothing left either, and the 10 trained still count
    one.resume_epoch(done)
    assert len(one) == 0 and one.total_size == 10
