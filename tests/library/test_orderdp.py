"""OrderDP against its published rule (shengze-xu/OrderDP, cifar/orderDP/orderDP.py): a uniform random pool each
epoch, its top-q share by last loss trained, no weights, scores from the trained samples' losses, no annealing."""
import io

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

import d3p
from d3p.methods.orderdp import _PURPOSE_ORDERDP, INITIAL_SCORE, OrderDP, target_sizes
from d3p.options import validate_options
from d3p.strategy import EpochLosses, epoch_rng


def test_sizes_are_the_published_truncations():
    s = OrderDP(1000)  # class defaults: pool 0.75, top-q 0.85
    assert (s.pool_size, s.kept_count) == (750, 637)  # int(0.75 * 1000), int(0.85 * 750): 36.3% pruned
    s = OrderDP(1001, pool_ratio=0.8, top_q_ratio=0.375)  # the README's CIFAR command
    assert (s.pool_size, s.kept_count) == (800, 300)
    assert (s.scores == INITIAL_SCORE).all() and INITIAL_SCORE == 3.0


def test_given_the_pool_and_scores_the_kept_set_is_the_pools_top_q():
    n = 500
    s = OrderDP(n, seed=4)
    s.scores = np.random.default_rng(1).random(n)  # distinct scores: no ties
    for epoch in range(5):
        pool = epoch_rng(4, epoch, _PURPOSE_ORDERDP).choice(n, size=375, replace=False)
        top = pool[np.argsort(-s.scores[pool])[: s.kept_count]]
        plan = s.plan_epoch(epoch)
        assert np.array_equal(plan.kept, np.sort(top))
        assert plan.weights is None and plan.record_losses  # no reweighting; losses feed the scores


def test_selection_frequencies_match_the_rule():
    """Fixed distinct scores: sample of rank j (1 = highest) is selected iff it is in the pool (s/n) and fewer
    than q of the other s-1 pool members outrank it (hypergeometric over the n-1 others, j-1 of them higher)."""
    n, epochs = 120, 3000
    s = OrderDP(n, seed=0)
    s.scores = np.random.default_rng(2).permutation(n).astype(np.float64)
    pool, q = s.pool_size, s.kept_count
    counts = np.zeros(n)
    for epoch in range(epochs):
        counts[s.plan_epoch(epoch).kept] += 1
    rank = np.empty(n, dtype=int)
    rank[np.argsort(-s.scores)] = np.arange(1, n + 1)
    p = pool / n * hypergeom(n - 1, rank - 1, pool - 1).cdf(q - 1)
    assert p.max() == pytest.approx(pool / n) and p.min() < 0.01  # the rule: the top always when drawn, the bottom never
    freq = counts / epochs
    assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / epochs) + 1e-9)


def test_scores_follow_the_trained_samples_losses_and_it_never_anneals():
    n = 300
    s = OrderDP(n, seed=1)
    trained = np.zeros(n, dtype=bool)
    for epoch in range(40):
        plan = s.plan_epoch(epoch)
        assert plan.kept.size == s.kept_count  # every epoch pruned: the published anneal branches both prune
        loss = np.zeros(n)
        count = np.zeros(n, dtype=np.int32)
        loss[plan.kept], count[plan.kept] = 0.01 * epoch + plan.kept / n, 1
        before = s.scores.copy()
        log = s.end_epoch(epoch, EpochLosses(loss, count))
        assert np.array_equal(s.scores[plan.kept], loss[plan.kept])
        rest = np.setdiff1d(np.arange(n), plan.kept)
        assert np.array_equal(s.scores[rest], before[rest])
        assert log["epoch_prune_ratio"] == pytest.approx(1 - s.kept_count / n)
        trained[plan.kept] = True
    assert (s.scores[~trained] == INITIAL_SCORE).all()


def test_initial_score_keeps_untrained_samples_first():
    """An untrained sample's 3.0 outranks every trained sample's loss below it: once its pool holds enough untrained
    samples, they are what is kept (the published consequence of starting at 3)."""
    s = OrderDP(200, seed=0)
    s.scores[:150] = 0.5  # trained, low loss
    plan, stats = s.plan_with_stats(0)
    pool = epoch_rng(0, 0, _PURPOSE_ORDERDP).choice(200, size=150, replace=False)
    untrained_in_pool = int((pool >= 150).sum())
    assert stats["never_trained_kept"] == min(untrained_in_pool, s.kept_count)


@pytest.mark.parametrize("ratio,pool,kept", [(0.5, 625, 500), (0.3, 875, 700), (0.1, 1000, 900), (0.7, 375, 300)])
def test_target_ratio_split(ratio, pool, kept):
    assert target_sizes(1000, ratio) == (pool, kept)
    s = OrderDP(1000, target_ratio=ratio)
    assert s.plan_epoch(3).kept.size == kept and abs(1 - kept / 1000 - ratio) < 1e-9
    assert kept < pool  # q < 1: never plain random


def test_target_ratio_never_reaches_q_1():
    with pytest.raises(ValueError, match="plain random"):
        target_sizes(100, 0.001)
    assert any("not both" in p for p in validate_options("orderdp", 10, {"orderdp_target_ratio": 0.5,
                                                                          "orderdp_pool": 0.9}))
    assert any("orderdp_top_q" in p for p in validate_options("orderdp", 10, {"orderdp_top_q": 1.0}))
    assert any("needs --prune_method orderdp" in p for p in validate_options("random", 10, {"orderdp_pool": 0.5}))


def test_state_round_trip_and_seeded_plans():
    a = d3p.DataPruner(400, "orderdp", epochs=6, seed=5).strategy
    for epoch in range(3):
        plan = a.plan_epoch(epoch)
        loss, count = np.zeros(400), np.zeros(400, dtype=np.int32)
        loss[plan.kept], count[plan.kept] = np.sin(plan.kept + epoch) + 2, 1
        a.end_epoch(epoch, EpochLosses(loss, count))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = OrderDP(400, seed=5)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert np.array_equal(a.plan_epoch(3).kept, b.plan_epoch(3).kept)
    assert not np.array_equal(OrderDP(400, seed=6).plan_epoch(0).kept, OrderDP(400, seed=5).plan_epoch(0).kept)
