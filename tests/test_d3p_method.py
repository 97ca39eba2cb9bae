"""D3P as a strategy: plans, decisions, state round trip, and rank consistency on 2 gloo ranks."""
import io
import os

import numpy as np
import pytest
import torch

from conftest import run_torchrun
from d3p.methods.d3p import D3P
from d3p.schedule import D3PSchedule
from d3p.strategy import EpochLosses
from dist_d3p_worker import synthetic_loss

N = 3001


def drive(strategy, epochs, start=0):
    """Feed every sample's synthetic loss in recording epochs, as the engine would."""
    for epoch in range(start, epochs):
        plan = strategy.plan_epoch(epoch)
        if plan.record_losses:
            seen = np.concatenate([plan.kept, plan.forward_only])
            assert np.array_equal(np.sort(seen), np.arange(N)), "a recording epoch must cover every sample"
            loss_sum = np.zeros(N)
            loss_sum[seen] = synthetic_loss(seen, epoch)
            strategy.end_epoch(epoch, EpochLosses(loss_sum, np.ones(N, dtype=np.int32)))
        else:
            strategy.end_epoch(epoch, None)
    return strategy


def make(seed=7):
    return D3P(N, D3PSchedule(start=2, period=2, window=2, epochs=8), bins=32, seed=seed)


def test_plans_follow_the_decision():
    s = make()
    assert s.plan_epoch(0).kept.size == N and s.plan_epoch(0).weights is None
    drive(s, 2)
    plan = s.plan_epoch(2)
    assert 0 < s.pruned.sum() < N
    assert np.array_equal(plan.kept, np.flatnonzero(~s.pruned))
    assert np.array_equal(plan.forward_only, np.flatnonzero(s.pruned))  # epoch 2 records (p == n)
    assert plan.weights is not None and (plan.weights[s.pruned] == 1).all()
    assert plan.normalize_weights


def test_decisions_reproducible_and_seed_dependent():
    a, b, c = drive(make(7), 4), drive(make(7), 4), drive(make(8), 4)
    assert np.array_equal(a.pruned, b.pruned) and np.array_equal(a.weights, b.weights)
    assert not np.array_equal(a.pruned, c.pruned), "the trimmed set ignores the seed"


def test_state_dict_round_trip_gives_identical_later_decisions():
    straight = drive(make(), 8)
    first = drive(make(), 3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    drive(restored, 8, start=3)
    assert np.array_equal(straight.pruned, restored.pruned)
    assert np.array_equal(straight.weights, restored.weights)


def test_load_state_rejects_other_dataset_or_schedule():
    state = make().state_dict()
    with pytest.raises(ValueError, match="samples"):
        D3P(N + 1, D3PSchedule(2, 2, 2, 8)).load_state_dict(state)
    with pytest.raises(ValueError, match="schedule"):
        D3P(N, D3PSchedule(3, 3, 2, 8)).load_state_dict(state)


def test_decisions_identical_on_two_gloo_ranks(tmp_path):
    res = run_torchrun(2, ["tests/dist_d3p_worker.py", str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert np.array_equal(r0["pruned"], r1["pruned"]) and np.array_equal(r0["weights"], r1["weights"])
    assert r0["fingerprint"][0] == r1["fingerprint"][0]
    # the losses cross the ranks once per epoch: one sum and one count vector of N elements each
    assert r0["calls"].tolist() == [2, 2, 2, 2] and r0["reduced"].tolist() == [2 * N] * 4
    # and equal to a single process that saw every loss itself
    single = drive(make(7), 4)
    assert np.array_equal(single.pruned, r0["pruned"]) and np.array_equal(single.weights, r0["weights"])


def test_rank_divergence_is_detected(tmp_path):
    res = run_torchrun(2, ["tests/dist_d3p_worker.py", str(tmp_path), "--diverge"], timeout=300)
    assert res.returncode != 0
    assert "ranks disagree on the pruning plan" in res.stdout + res.stderr
    assert not os.path.exists(tmp_path / "rank0.npz")


def _feed_constant_window(strategy, values):
    for epoch in range(2):
        strategy.plan_epoch(epoch)
        log = strategy.end_epoch(epoch, EpochLosses(values.astype(np.float64), np.ones(values.size, dtype=np.int32)))
    return log


def test_zero_variance_window_prunes_nothing_and_says_so():
    s = make()
    log = _feed_constant_window(s, np.full(N, 0.5))
    assert not s.pruned.any() and (s.weights == 1).all()
    assert "zero variance" in log["d3p_note"]
    assert s.plan_epoch(2).kept.size == N


def test_a_decision_never_leaves_less_than_min_kept():
    # two far-apart tight clusters: the ideal (unimodal) law expects few samples in either bin, so
    # trimming would keep only 162 of 3001; the decision restores up to min_kept and says so
    values = np.where(np.arange(N) % 2 == 0, 0.1, 5.0) + 1e-3 * np.sin(np.arange(N))
    s = D3P(N, D3PSchedule(start=2, period=2, window=2, epochs=8), bins=32, seed=7, min_kept=256)
    log = _feed_constant_window(s, values)
    assert log["d3p_restored"] > 0
    assert int((~s.pruned).sum()) == 256 and "restored" in log["d3p_note"]


def test_samples_without_a_loss_are_pruned_and_counted():
    """An unreadable image replaced under --skip_corrupt never gets a loss: it cannot be scored."""
    s, missing = make(), np.array([5, 17, 2000])
    for epoch in range(2):
        s.plan_epoch(epoch)
        count = np.ones(N, dtype=np.int32)
        count[missing] = 0
        loss_sum = synthetic_loss(np.arange(N), epoch) * count
        log = s.end_epoch(epoch, EpochLosses(loss_sum, count))
    assert log["d3p_unscored"] == 3 and s.pruned[missing].all()
    assert (s.weights[missing] == 1).all()
    # the others are decided exactly as without the missing samples
    ref = drive(make(), 2)
    keep = np.setdiff1d(np.arange(N), missing)
    assert 0 < s.pruned[keep].sum() < keep.size and s.pruned.sum() > 3
    assert abs(int(s.pruned[keep].sum()) - int(ref.pruned.sum())) <= 0.02 * N
