"""D3P at a target ratio (this project's extension, docs/spec.md): the ideal histogram's counts scaled by one factor
c so that each decision keeps round((1 - R) N) samples; unset, the published method."""
import os

import numpy as np
import pytest

from d3p.methods.d3p import D3P
from d3p.schedule import D3PSchedule
from d3p.stats import cld_score, decide, ideal_cld_density, scaled_bin_targets, support_boundary
from test_d3p_method import drive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WINDOWS = np.load(os.path.join(ROOT, "tests", "data", "mae_digits_windows.npz"))["windows"]  # (6, 3, 1500)


def test_scaled_targets_sum_exactly_and_follow_the_ideal_shape():
    rng = np.random.default_rng(0)
    o = np.array([0, 5, 40, 90, 120, 60, 10, 3], dtype=np.int64)
    x = np.array([1.5, 8.2, 30.7, 80.1, 100.9, 70.3, 20.4, 2.2])
    for kept in range(0, int(o.sum()) + 1):
        t, c = scaled_bin_targets(o, x, kept, rng)
        assert t.sum() == kept and (t >= 0).all() and (t <= o).all()
        # every bin holds min(o_k, floor(c x_k)), less one at most in bins that stepped at c (ties)
        full = np.minimum(o, np.floor(c * x).astype(np.int64))
        assert ((full - t >= 0) & (full - t <= 1)).all()
    # c = 1 reproduces the published targets floor(x_k) capped by o_k
    published = np.minimum(o, np.floor(x).astype(np.int64))
    t, c = scaled_bin_targets(o, x, int(published.sum()), rng)
    assert np.array_equal(t, published) and c <= 1.0
    # more than the support holds: all of it
    t, _ = scaled_bin_targets(o, x, 10**6, rng)
    assert np.array_equal(t, o)


def test_ties_give_back_exactly_the_overshoot():
    o = np.full(6, 10, dtype=np.int64)
    x = np.full(6, 4.0)  # every bin steps at the same c: sums jump by 6
    for kept in range(1, 61):
        t, _ = scaled_bin_targets(o, x, kept, np.random.default_rng(kept))
        assert t.sum() == kept and t.max() - t.min() <= 1


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_every_mae_digits_decision_realises_the_ratio(ratio):
    n = WINDOWS.shape[2]
    for d, window in enumerate(WINDOWS):
        target = round((1 - ratio) * n)
        dec = decide(window, bins=128, rng=np.random.default_rng(d), target_kept=target)
        assert dec.num_samples - dec.num_pruned == target, (d, dec.num_pruned)
        assert abs(dec.prune_ratio - ratio) <= 0.01
        cld = cld_score(window)
        a, b = dec.support
        assert dec.pruned[(cld < a) | (cld > b)].all()  # outside the support stays pruned
        # the kept in-support histogram is min(o_k, floor(c x_k)) up to ties: the ideal shape, scaled
        kept_hist = np.histogram(np.clip(cld[~dec.pruned], a, b), bins=128, range=(a, b))[0]
        width = (b - a) / 128
        ideal = n * dec.density.pdf(a + width * (np.arange(128) + 0.5)) * width
        full = np.minimum(dec.observed, np.floor(dec.scale * ideal).astype(np.int64))
        assert np.abs(full - kept_hist).max() <= 1 and (full - kept_hist).sum() >= 0
        # weights follow the same matching: a sample of an under-filled bin weighs floor(c x_k) / o_k, others 1
        scaled = np.floor(dec.scale * ideal)
        k = np.clip(np.floor((cld - a) / width), 0, 127).astype(int)
        under = (dec.observed > 0) & (dec.observed < scaled)
        expect_w = np.where(under, scaled / np.maximum(dec.observed, 1), 1.0).astype(np.float32)[k]
        assert np.array_equal(dec.weights[~dec.pruned], expect_w[~dec.pruned])
        if ratio == 0.3:
            assert dec.upweighted > 0  # keeping more than the published ~10% pruned fills bins short of c x_k


def test_unset_target_is_the_published_decision():
    for d, window in enumerate(WINDOWS[:3]):
        a = decide(window, rng=np.random.default_rng(d))
        b = decide(window, rng=np.random.default_rng(d), target_kept=None)
        assert np.array_equal(a.pruned, b.pruned) and np.array_equal(a.weights, b.weights) and b.scale == 1.0
        # the published decision's own kept count as the target gives the published kept set size
        c = decide(window, rng=np.random.default_rng(d), target_kept=a.num_samples - a.num_pruned)
        assert c.num_pruned == a.num_pruned


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_strategy_realises_the_ratio_in_every_pruned_epoch(ratio):
    n = 3001
    s = D3P(n, D3PSchedule(start=2, period=2, window=2, epochs=10), bins=32, seed=3, target_ratio=ratio)
    pruned_epochs = 0
    for epoch in range(10):
        drive(s, epoch + 1, start=epoch)
        plan = s.plan_epoch(epoch + 1) if epoch + 1 < 10 else None
        if plan is not None and plan.kept.size < n:
            pruned_epochs += 1
            assert abs(1 - plan.kept.size / n - ratio) <= 0.01
            assert plan.kept.size == round((1 - ratio) * n)
    assert pruned_epochs >= 7


def test_target_ratio_is_refused_outside_its_range_and_for_other_methods():
    from d3p.options import validate_options
    with pytest.raises(ValueError, match="target_ratio"):
        D3P(10, D3PSchedule(2, 2, 2, 10), target_ratio=1.0)
    assert any("d3p_target_ratio" in p for p in validate_options("d3p", 10, {"d3p_target_ratio": 1.2}))
    assert any("--d3p_target_ratio needs --prune_method d3p" in p
               for p in validate_options("random", 10, {"d3p_target_ratio": 0.5}))
    assert validate_options("d3p", 10, {"d3p_target_ratio": 0.5}) == []
