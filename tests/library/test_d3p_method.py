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


def test_samples_without_a_loss_are_kept_and_counted():
    """A sample a drop_last loader left out, or an unreadable image replaced under --skip_corrupt, gets no loss:
    it cannot be scored, so it is kept with weight 1 (issue 29: pruning it would prune samples because the loader
    dropped them)."""
    s, missing = make(), np.array([5, 17, 2000])
    for epoch in range(2):
        s.plan_epoch(epoch)
        count = np.ones(N, dtype=np.int32)
        count[missing] = 0
        loss_sum = synthetic_loss(np.arange(N), epoch) * count
        log = s.end_epoch(epoch, EpochLosses(loss_sum, count))
    assert log["d3p_unscored"] == 3 and not s.pruned[missing].any()
    assert (s.weights[missing] == 1).all()
    # the others are decided exactly as a dataset without the missing samples would be: the same window
    # columns, the same seed and epoch (so the same trimming draw)
    keep = np.setdiff1d(np.arange(N), missing)
    ref = D3P(keep.size, D3PSchedule(start=2, period=2, window=2, epochs=8), bins=32, seed=7)
    for epoch in range(2):
        ref.plan_epoch(epoch)
        ref_log = ref.end_epoch(epoch, EpochLosses(synthetic_loss(keep, epoch), np.ones(keep.size, dtype=np.int32)))
    assert 0 < s.pruned[keep].sum() < keep.size
    np.testing.assert_array_equal(s.pruned[keep], ref.pruned)
    np.testing.assert_array_equal(s.weights[keep], ref.weights)
    assert log["d3p_decision_pruned"] == ref_log["d3p_decision_pruned"]  # the unscored ones are kept
    for key in ("d3p_easy", "d3p_hard", "d3p_trimmed", "d3p_upweighted"):
        assert log[key] == ref_log[key], key


def test_anneal_tail_trains_all_data_unweighted_and_records_nothing():
    """--d3p_anneal_epochs K: the last K epochs train every sample with weight 1, no forward-only pass, no
    recording, no decision, even right after a decision that pruned and up-weighted."""
    sched = D3PSchedule(start=2, period=2, window=2, epochs=8, anneal_epochs=3)  # spec epochs 6, 7, 8 anneal
    s = drive(D3P(N, sched, bins=32, seed=7), 5)  # decisions at spec 2 and 4; spec 5 records nothing
    before = s.plan_epoch(4)
    # the guard: the epoch before the tail trains a pruned, up-weighted set
    assert 0 < before.kept.size < N and before.weights is not None and (before.weights > 1).any()
    assert s.decisions == 2
    for epoch in (5, 6, 7):
        plan = s.plan_epoch(epoch)
        np.testing.assert_array_equal(plan.kept, np.arange(N))
        assert plan.weights is None, f"epoch {epoch}: weights in the anneal tail"
        assert plan.forward_only.size == 0 and not plan.record_losses
        assert s.end_epoch(epoch, None) == {}
    assert s.decisions == 2


def test_data_pruner_window_holds_every_samples_mean_loss():
    """In process, through DataPruner (what the 2-rank test checks across ranks): after a recording epoch with a
    forward-only pass over the pruned samples and padding duplicates in both passes, every sample of the window
    holds its loss: none is NaN (forward-only losses kept) and a sample seen twice holds the MEAN of its two
    losses (2 l and 0 -> l), not their sum. The decision then equals one made from the exact losses."""
    from d3p.integration import DataPruner

    sched = D3PSchedule(start=2, period=3, window=2, epochs=6)  # spec 1, 2 record; 4 records with forward-only
    pruner = DataPruner(N, D3P(N, sched, bins=32, seed=7))
    ref = D3P(N, sched, bins=32, seed=7)
    rng = np.random.default_rng(0)

    def feed(indices, losses, sink):  # batches of 256, each padded sample's two losses 2 l and 0
        dup = indices[:5]
        idx = np.concatenate([indices, dup])
        val = np.concatenate([losses[indices], losses[dup] * 2, np.zeros(dup.size, np.float32)])
        val[: indices.size][np.isin(indices, dup)] = 0.0
        order = rng.permutation(idx.size)
        for start in range(0, idx.size, 256):
            pick = order[start : start + 256]
            sink(torch.from_numpy(val[pick]), torch.from_numpy(idx[pick]))

    for epoch in range(5):
        loss = synthetic_loss(np.arange(N), epoch).astype(np.float32)  # exact in float32: no rounding doubts
        plan = pruner.begin_epoch(epoch)
        feed(plan.kept, loss, lambda l, i: pruner.batch_loss(l, i))
        if pruner.forward_only_indices.size:
            feed(pruner.forward_only_indices, loss, lambda l, i: pruner.record(i, l))
        pruner.end_epoch(epoch)
        ref_plan = ref.plan_epoch(epoch)
        ref.end_epoch(epoch, EpochLosses(loss.astype(np.float64), np.ones(N, dtype=np.int32))
                      if ref_plan.record_losses else None)
        if epoch == 3:  # recording, not deciding; trained the pruned set of the first decision
            assert 0 < plan.forward_only.size < N
            window = pruner.state_dict()["strategy"]["window"].numpy()
            filled = [row for row in window if not np.isnan(row).all()]
            assert len(filled) == 1, "one recorded epoch in the window"
            assert np.isfinite(filled[0]).all(), f"{int(np.isnan(filled[0]).sum())} samples without a loss"
            np.testing.assert_array_equal(filled[0], loss)
    assert pruner.strategy.decisions == ref.decisions == 2
    np.testing.assert_array_equal(pruner.strategy.pruned, ref.pruned)
    np.testing.assert_array_equal(pruner.strategy.weights, ref.weights)
