"""RS2 (d3p/methods/rs2.py) against the rule of the published sampler (`UniformNoReplacement`, PatrikOkanovic/RS2):
chunk by chunk, its coverage per pass, rank agreement under 2 gloo ranks, exact resume."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import d3p
from conftest import run_torchrun
from d3p.methods.rs2 import RS2


class PublishedRule:
    """The published sampler's start/end bookkeeping, transcribed as a state machine (test reference).

    select(): on the first call, or when the previous chunk wrapped (end < start) or ended at N: reshuffle,
    start = 0, end = k; else start = end, end = (end + k) mod (N + 1). The chunk is perm[start:end] when
    start < end, else perm[start:] + perm[:end]. `shuffle()` supplies the next permutation.
    """

    def __init__(self, n: int, k: int, shuffle):
        self.n, self.k, self.shuffle = n, k, shuffle
        self.start = self.end = None
        self.perm = None
        self.resets = []

    def select(self, call: int) -> np.ndarray:
        if self.start is None or self.end < self.start or self.end == self.n:
            self.perm = self.shuffle()
            self.start, self.end = 0, self.k
            self.resets.append(call)
        else:
            self.start = self.end
            self.end = (self.end + self.k) % (self.n + 1)
        if self.start < self.end:
            return self.perm[self.start:self.end]
        return np.concatenate((self.perm[self.start:], self.perm[:self.end]))


# (N, r): k | N; a wrap with a non-empty head (N=10, k=3: end 1); a wrap with an empty head (N=11, k=3: end 0);
# r = 0 (k = N: a reshuffle every epoch); k = 1; the digits at D3P's emergent ratio
CASES = [(12, 0.75), (10, 0.7), (11, 0.75), (7, 0.0), (5, 0.8), (1500, 0.088)]


@pytest.mark.parametrize("n, ratio", CASES)
def test_chunks_follow_the_published_sampler(n, ratio):
    rs2 = RS2(n, ratio, seed=4)
    k = round(n * (1 - ratio))  # the published coreset_size: round(n_train * fraction)
    assert rs2.chunk == k
    passes = iter(range(10_000))
    ref = PublishedRule(n, k, lambda: rs2.permutation(next(passes)))
    epochs = 3 * rs2.pass_epochs + 2
    for epoch in range(epochs):
        expected = ref.select(epoch)
        np.testing.assert_array_equal(rs2.epoch_indices(epoch), expected)
        plan = rs2.plan_epoch(epoch)
        np.testing.assert_array_equal(plan.kept, np.sort(expected))
        assert plan.kept.dtype == np.int64 and plan.weights is None and not plan.record_losses
        assert rs2.end_epoch(epoch, None)["kept"] == expected.size
    # the published reshuffles fall exactly on the pass boundaries: every ceil(N / k) epochs
    assert ref.resets == list(range(0, epochs, -(-n // k)))


@pytest.mark.parametrize("n, ratio", CASES)
def test_every_sample_once_per_pass(n, ratio):
    rs2 = RS2(n, ratio, seed=1)
    k, length = rs2.chunk, rs2.pass_epochs
    m, extra = divmod(n, k)
    for c in range(3):
        counts = np.zeros(n, dtype=np.int64)
        sizes = []
        for epoch in range(c * length, (c + 1) * length):
            kept = rs2.plan_epoch(epoch).kept
            counts[kept] += 1
            sizes.append(kept.size)
        assert counts.min() == 1, "a pass of ceil(N / k) epochs trains every sample"
        if extra == 0:  # k divides N: N / k = 1 / (1 - r) epochs, each sample exactly once
            assert length == m and counts.max() == 1 and sizes == [k] * m
        else:  # the wrapping chunk: the unseen tail plus the permutation's head, one short (modulus N + 1)
            head = (m + 1) * k - n - 1
            assert length == m + 1 and sizes == [k] * m + [k - 1]
            assert (counts == 2).sum() == head and counts.max() <= 2
            first = rs2.permutation(c)[:head]
            assert np.all(counts[first] == 2)


def test_passes_reshuffle_and_seeds_differ():
    a, b = RS2(100, 0.5, seed=0), RS2(100, 0.5, seed=1)
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.plan_epoch(0).kept, b.plan_epoch(0).kept)
    # a pure function of (seed, epoch): a second instance agrees at any epoch, in any order
    c = RS2(100, 0.5, seed=0)
    for epoch in (7, 0, 3):
        np.testing.assert_array_equal(a.plan_epoch(epoch).kept, c.plan_epoch(epoch).kept)


def test_resume_through_the_api_is_exact_and_refuses_another_ratio():
    def run(epochs, start=0, state=None, ratio=0.6):
        pruner = d3p.DataPruner(50, "rs2", epochs=epochs, seed=2, prune_ratio=ratio)
        if state is not None:
            pruner.load_state_dict(state)
        kept = []
        for epoch in range(start, epochs):
            kept.append(pruner.begin_epoch(epoch).kept.copy())
            pruner.end_epoch(epoch)
        return pruner, kept

    _, straight = run(7)
    first, part = run(3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed, rest = run(7, start=3, state=state)
    for x, y in zip(straight, part + rest):
        np.testing.assert_array_equal(x, y)
    assert resumed.summary()["samples_trained"] == sum(k.size for k in straight)
    assert resumed.summary()["flags"] == {"prune_ratio": 0.6}
    with pytest.raises(ValueError, match="prune_ratio"):
        run(7, start=3, state=state, ratio=0.5)


def test_bad_ratio_is_refused():
    with pytest.raises(ValueError, match="prune_ratio"):
        d3p.DataPruner(10, "rs2", prune_ratio=1.0)


def test_two_gloo_ranks_split_the_same_chunks(tmp_path):
    res = run_torchrun(2, ["tests/dist_rs2_worker.py", str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    np.testing.assert_array_equal(r0["fingerprints"], r1["fingerprints"])
    ref = RS2(45, 0.7, seed=9)  # the worker's configuration
    for epoch in range(r0["shares"].shape[0]):
        union = np.union1d(r0["shares"][epoch], r1["shares"][epoch])
        np.testing.assert_array_equal(union, ref.plan_epoch(epoch).kept)
