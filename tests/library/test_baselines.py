"""Tests of the dynamic baselines (d3p/methods/): InfoBatch, SeTa, RandomDynamic, NoPruning."""
from __future__ import annotations

import io
import itertools
import json
import math

import numpy as np
import pytest
import torch

from d3p.methods.common import anneal_start, kept_size
from d3p.methods.infobatch import InfoBatch
from d3p.methods.none import NoPruning
from d3p.methods.random import RandomDynamic
from d3p.methods.seta import SETA_INITIAL_SCORE, SeTa, kmeans_1d, seta_window
from d3p.strategy import EpochLosses
from util.run_folder import read_kept_counts  # the fork's run folder (log.txt): outside the d3p package


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def synthetic_loss(epoch: int, n: int) -> np.ndarray:
    """Deterministic per-sample losses that change with the epoch (so scores and decisions evolve)."""
    rng = np.random.default_rng([1234, epoch])
    base = np.linspace(0.2, 1.2, n)
    return base * (1.0 - 0.03 * epoch) + rng.normal(0.0, 0.1, n)


def epoch_losses(plan_kept: np.ndarray, values: np.ndarray) -> EpochLosses:
    """Losses as the engine reports them: only the trained samples have a loss (count 1)."""
    n = values.size
    count = np.zeros(n, dtype=np.int32)
    count[plan_kept] = 1
    return EpochLosses(loss_sum=np.where(count > 0, values, 0.0), count=count)


def drive(strategy, epochs: range) -> list[tuple[np.ndarray, np.ndarray | None, dict]]:
    """Run the engine protocol for the given epochs; returns (kept, weights, log) per epoch."""
    out = []
    for epoch in epochs:
        plan = strategy.plan_epoch(epoch)
        losses = epoch_losses(plan.kept, synthetic_loss(epoch, strategy.num_samples)) if plan.record_losses else None
        log = strategy.end_epoch(epoch, losses)
        out.append((plan.kept.copy(), None if plan.weights is None else plan.weights.copy(), log))
    return out


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_resume_equal(make, total: int, split: int) -> None:
    """Uninterrupted run == run interrupted after `split` epochs and resumed from a saved state_dict."""
    full = drive(make(), range(total))
    first = make()
    part = drive(first, range(split))
    resumed = make()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    part += drive(resumed, range(split, total))
    assert len(full) == len(part)
    for (k1, w1, l1), (k2, w2, l2) in zip(full, part):
        np.testing.assert_array_equal(k1, k2)
        assert (w1 is None) == (w2 is None)
        if w1 is not None:
            np.testing.assert_array_equal(w1, w2)
        assert l1 == l2


def check_plan_contract(plan, n: int) -> None:
    assert plan.kept.dtype == np.int64
    assert np.all(np.diff(plan.kept) > 0), "kept must be sorted and unique"
    assert plan.kept.size == 0 or (plan.kept[0] >= 0 and plan.kept[-1] < n)
    if plan.weights is not None:
        assert plan.weights.dtype == np.float32 and plan.weights.shape == (n,)


# ------------------------------------------------------------------------------------------------------------------
# helpers of the module
# ------------------------------------------------------------------------------------------------------------------
def _published_switch_epoch(num_epochs: int, delta: float) -> int:
    """0-based epoch at which the published InfoBatch/SeTa samplers switch to full data.

    Their sampler's call counter is 1 in the first epoch (SeTa starts it at 1; InfoBatch calls reset() once in its
    constructor) and an epoch is pruned while `counter <= num_epochs * delta` (a float comparison).
    """
    counter = 1
    while counter <= num_epochs * delta:
        counter += 1
    return counter - 1


@pytest.mark.parametrize("num_epochs, expected", [(10, 8), (16, 14), (20, 17), (300, 262), (800, 700)])
def test_anneal_start_matches_published_samplers(num_epochs, expected):
    assert _published_switch_epoch(num_epochs, 0.875) == expected
    assert anneal_start(num_epochs, 0.875) == expected
    assert InfoBatch(10, num_epochs, delta=0.875).anneal_epoch == expected
    assert SeTa(10, num_epochs, delta=0.875).anneal_epoch == expected


def test_anneal_start_exact_decimal():
    assert anneal_start(10, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floats; exact decimal arithmetic
    assert anneal_start(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert anneal_start(10, 1.0) == 10  # never anneal
    assert anneal_start(10, 0.0) == 0


def test_kept_size():
    assert kept_size(1000, 0.5) == 500
    assert kept_size(1000, 0.3) == 700
    assert kept_size(3, 0.9) == 1  # never an empty epoch
    with pytest.raises(ValueError):
        kept_size(10, 1.0)


def test_no_pruning():
    s = NoPruning(7)
    plan = s.plan_epoch(3)
    np.testing.assert_array_equal(plan.kept, np.arange(7))
    assert plan.weights is None and not plan.record_losses
    assert s.end_epoch(3, None)["kept"] == 7
    assert_resume_equal(lambda: NoPruning(50), 4, 2)


# ------------------------------------------------------------------------------------------------------------------
# InfoBatch
# ------------------------------------------------------------------------------------------------------------------
def test_infobatch_first_epoch_full():
    s = InfoBatch(1000, num_epochs=10, prune_ratio=0.5, seed=3)
    plan = s.plan_epoch(0)
    check_plan_contract(plan, 1000)
    assert plan.kept.size == 1000 and plan.record_losses and not plan.normalize_weights
    np.testing.assert_array_equal(plan.weights, np.ones(1000, dtype=np.float32))


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_infobatch_realised_ratio_and_weights(ratio):
    n = 20000
    s = InfoBatch(n, num_epochs=100, prune_ratio=ratio, seed=7)
    s.plan_epoch(0)
    scores = np.random.default_rng(0).exponential(1.0, n)  # skewed: about 63% below the mean
    s.end_epoch(0, EpochLosses(loss_sum=scores, count=np.ones(n, dtype=np.int32)))
    plan = s.plan_epoch(1)
    check_plan_contract(plan, n)
    below = scores < scores.mean()
    pruned = np.setdiff1d(np.arange(n), plan.kept)
    assert np.all(below[pruned]), "only below-mean samples may be pruned"
    nb = int(below.sum())
    sd = math.sqrt(nb * ratio * (1 - ratio))
    assert abs(pruned.size - ratio * nb) < 4 * sd
    # Weights: exactly 1/(1-r) for kept below-mean samples, 1 for the others.
    kept_mask = np.zeros(n, dtype=bool)
    kept_mask[plan.kept] = True
    expected = np.where(below & kept_mask, np.float32(1.0 / (1.0 - ratio)), np.float32(1.0))
    np.testing.assert_array_equal(plan.weights, expected)
    assert not plan.normalize_weights
    log = s.end_epoch(1, epoch_losses(plan.kept, scores))
    assert log["kept"] == plan.kept.size
    assert log["infobatch_realised_ratio"] == pytest.approx(pruned.size / n)
    assert log["infobatch_realised_ratio"] < ratio
    assert log["infobatch_below_mean_fraction"] == pytest.approx(nb / n)


def test_infobatch_scores_update_only_trained_samples():
    n = 100
    s = InfoBatch(n, num_epochs=10, seed=0)
    s.plan_epoch(0)
    first = np.arange(n, dtype=np.float64)
    s.end_epoch(0, EpochLosses(loss_sum=first, count=np.ones(n, dtype=np.int32)))
    plan = s.plan_epoch(1)
    assert plan.kept.size < n
    second = np.full(n, 1000.0)
    s.end_epoch(1, epoch_losses(plan.kept, second))
    expected = first.copy()
    expected[plan.kept] = 1000.0
    np.testing.assert_array_equal(s.scores, expected)
    # A sample seen twice (distributed padding) gets its mean loss.
    s.plan_epoch(2)
    count = np.zeros(n, dtype=np.int32)
    count[5] = 2
    s.end_epoch(2, EpochLosses(loss_sum=np.where(count > 0, 6.0, 0.0), count=count))
    assert s.scores[5] == 3.0


def test_infobatch_annealing_epoch_e10():
    n = 1000
    s = InfoBatch(n, num_epochs=10, prune_ratio=0.5, delta=0.875, seed=1)
    assert s.anneal_epoch == 8  # published: 0-based epochs 0..7 pruned, 8 and 9 full
    results = drive(s, range(10))
    for epoch in range(1, 8):
        assert results[epoch][0].size < n, f"epoch {epoch} must be pruned"
        assert not results[epoch][2]["infobatch_annealing"]
    for epoch in (8, 9):
        kept, weights, log = results[epoch]
        assert kept.size == n and log["infobatch_annealing"] and log["infobatch_realised_ratio"] == 0.0
        assert weights is None or np.all(weights == 1.0)


def test_infobatch_resume():
    assert_resume_equal(lambda: InfoBatch(500, num_epochs=8, prune_ratio=0.5, seed=5), total=8, split=3)


def test_infobatch_deterministic_across_instances():
    a = drive(InfoBatch(300, 6, seed=9), range(6))
    b = drive(InfoBatch(300, 6, seed=9), range(6))
    for (k1, w1, _), (k2, w2, _) in zip(a, b):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(w1, w2)


# ------------------------------------------------------------------------------------------------------------------
# SeTa
# ------------------------------------------------------------------------------------------------------------------
def test_seta_window_positions():
    g, scale = 10, 0.5
    assert seta_window(g, scale, 0) == (0, g)  # t = 0 keeps all groups
    starts = [seta_window(g, scale, t)[0] for t in range(1, 15)]
    # slides 1..G-w (start 0 was t = 0), then wraps to 0, 1, ...
    assert starts == [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert all(seta_window(g, scale, t)[1] == 5 for t in range(1, 15))
    assert seta_window(4, 0.5, 4) == (1, 2)  # 4 % (4 - 2 + 1)


def test_kmeans_1d_separated_and_degenerate():
    rng = np.random.default_rng(0)
    levels = np.repeat(np.arange(10) * 10.0, 50)
    values = rng.permutation(levels + rng.normal(0, 0.5, levels.size))
    labels, centres = kmeans_1d(values, 10)
    assert centres.size == 10 and np.all(np.diff(centres) > 0)
    np.testing.assert_array_equal(labels, np.round(values / 10).astype(np.int64))
    # Fewer distinct values than groups: one group per distinct value, ordered.
    labels, centres = kmeans_1d(np.array([3.0, 1.0, 3.0, 2.0, 1.0]), 10)
    np.testing.assert_array_equal(centres, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(labels, [2, 0, 2, 1, 0])
    labels, centres = kmeans_1d(np.full(7, 0.5), 3)
    assert centres.size == 1 and np.all(labels == 0)


def _wcss(values: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((values[labels == g] - values[labels == g].mean()) ** 2).sum() for g in np.unique(labels)))


def _brute_force_kmeans_1d(values: np.ndarray, groups: int) -> tuple[float, np.ndarray]:
    """(optimal WCSS, labels) by enumerating every cut of the sorted values into `groups` contiguous runs.

    Cuts between equal values are skipped (an optimal partition never splits equal values).
    """
    order = np.argsort(values, kind="stable")
    xs = values[order]
    n = xs.size
    allowed = [c for c in range(1, n) if xs[c] != xs[c - 1]]
    best, best_bounds = np.inf, None
    for cut in itertools.combinations(allowed, groups - 1):
        bounds = (0, *cut, n)
        cost = sum(((xs[a:b] - xs[a:b].mean()) ** 2).sum() for a, b in zip(bounds[:-1], bounds[1:]))
        if cost < best:
            best, best_bounds = cost, bounds
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.repeat(np.arange(groups), np.diff(best_bounds))
    return float(best), labels


def test_kmeans_1d_equals_brute_force():
    rng = np.random.default_rng(5)
    checked = 0
    for trial in range(60):
        n = int(rng.integers(4, 13))
        groups = int(rng.integers(2, 6))
        values = rng.lognormal(0.0, 1.5, n)  # heavy-tailed, like losses
        if trial % 3 == 0:
            values = np.round(values, 1)  # ties
        if np.unique(values).size <= groups:
            continue
        best, ref_labels = _brute_force_kmeans_1d(values, groups)
        labels, centres = kmeans_1d(values, groups)
        assert centres.size == groups and np.all(np.diff(centres) > 0)
        assert _wcss(values, labels) == pytest.approx(best, rel=1e-9, abs=1e-12)
        np.testing.assert_array_equal(labels, ref_labels)  # unique optimum for continuous random values
        checked += 1
    assert checked > 40


def _reference_kmeans_1d_cost(values: np.ndarray, groups: int) -> float:
    """Optimal WCSS by the plain O(G N^2) dynamic programme (an independent check of the fast one)."""
    xs = np.sort(values)
    n = xs.size
    p1 = np.concatenate([[0.0], np.cumsum(xs)])
    p2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    cost = np.array([p2[j] - p1[j] ** 2 / j if j else 0.0 for j in range(n + 1)])
    for _ in range(1, groups):
        new = np.full(n + 1, np.inf)
        for j in range(1, n + 1):
            i = np.arange(j)
            new[j] = np.min(cost[i] + (p2[j] - p2[i]) - (p1[j] - p1[i]) ** 2 / (j - i))
        cost = new
    return float(cost[n])


@pytest.mark.parametrize("kind", ["lognormal", "pareto"])
def test_kmeans_1d_optimal_on_heavy_tailed_scores(kind):
    # Lloyd's iterations from quantile centres (the old kmeans_1d) stop 1.5-17x above the optimum on such inputs.
    rng = np.random.default_rng(7)
    values = rng.lognormal(0.0, 1.5, 300) if kind == "lognormal" else rng.pareto(1.5, 300)
    labels, _ = kmeans_1d(values, 10)
    assert _wcss(values, labels) == pytest.approx(_reference_kmeans_1d_cost(values, 10), rel=1e-9)


def _seta_with_level_scores(n: int, num_epochs: int = 20):
    """SeTa whose scores form 10 well-separated levels (level = i % 10), so the k-means groups are the levels."""
    s = SeTa(n, num_epochs=num_epochs, prune_ratio=0.5, groups=10, window_scale=0.5, seed=2)
    level = np.arange(n) % 10
    loss = level * 1.0 + np.random.default_rng(0).uniform(0, 0.1, n)
    return s, level, loss


def test_seta_sliding_window_over_kmeans_groups():
    n = 4000
    s, level, loss = _seta_with_level_scores(n)
    plan0 = s.plan_epoch(0)
    np.testing.assert_array_equal(plan0.kept, s.epoch_subset(0))  # t = 0: the whole subset
    assert plan0.kept.size == kept_size(n, 0.5) and plan0.weights is None
    # Give every sample a score (as if all had been trained) so the groups are exactly the levels.
    s.end_epoch(0, EpochLosses(loss_sum=loss, count=np.ones(n, dtype=np.int32)))
    expected_starts = [1, 2, 3, 4, 5, 0, 1, 2]
    for epoch, start in zip(range(1, 9), expected_starts):
        plan = s.plan_epoch(epoch)
        check_plan_contract(plan, n)
        subset = s.epoch_subset(epoch)
        window_levels = np.arange(start, start + 5)
        expected = subset[np.isin(level[subset], window_levels)]
        np.testing.assert_array_equal(plan.kept, expected)
        log = s.end_epoch(epoch, epoch_losses(plan.kept, loss))
        assert log["seta_window_start"] == start and log["seta_window"] == 5 and log["seta_groups"] == 10
        assert log["kept"] == plan.kept.size


def test_seta_unscored_samples_get_published_initial_score():
    # MAE-scale losses in [0.2, 1.2]; after epoch 0 only its random half has a score. The published code gives the
    # others its initial score 3.0: they form the top group on their own, outside the epoch-1 window (groups 1..5).
    n = 2000
    s = SeTa(n, num_epochs=20, prune_ratio=0.5, groups=10, window_scale=0.5, seed=2)
    assert s.initial_score == SETA_INITIAL_SCORE == 3.0
    loss = np.random.default_rng(0).uniform(0.2, 1.2, n)
    plan0 = s.plan_epoch(0)
    s.end_epoch(0, epoch_losses(plan0.kept, loss))
    assert np.isnan(s.scores).sum() == n - plan0.kept.size
    plan1 = s.plan_epoch(1)
    check_plan_contract(plan1, n)
    subset = s.epoch_subset(1)
    unscored = subset[~np.isin(subset, plan0.kept)]
    assert unscored.size > 300
    assert not np.isin(unscored, plan1.kept).any()
    # The same plan from the published grouping: k-means over the subset's scores with 3.0 for the unscored.
    labels, centres = kmeans_1d(np.where(np.isin(subset, plan0.kept), loss[subset], 3.0), 10)
    assert centres[-1] == 3.0
    np.testing.assert_array_equal(plan1.kept, subset[(labels >= 1) & (labels < 6)])
    assert plan1.kept.size / subset.size < 0.5
    log = s.end_epoch(1, epoch_losses(plan1.kept, loss))
    assert log["seta_unscored_in_subset"] == unscored.size


def test_seta_initial_score_is_configurable():
    s = SeTa(100, num_epochs=10, initial_score=0.0)
    assert s.initial_score == 0.0
    with pytest.raises(ValueError, match="initial_score"):
        SeTa(100, num_epochs=10, initial_score=float("nan"))


def test_seta_annealing_subset_size():
    n = 999
    s = SeTa(n, num_epochs=16, prune_ratio=0.3, delta=0.875, seed=4)
    assert s.anneal_epoch == 14
    results = drive(s, range(16))
    for epoch in (14, 15):
        kept, weights, log = results[epoch]
        assert kept.size == round(0.7 * n) and weights is None and log["seta_annealing"]
    assert not np.array_equal(results[14][0], results[15][0])
    assert results[13][0].size < round(0.7 * n)  # still windowed before annealing


def test_seta_resume():
    assert_resume_equal(lambda: SeTa(600, num_epochs=10, prune_ratio=0.5, seed=8), total=10, split=4)


# ------------------------------------------------------------------------------------------------------------------
# RandomDynamic and read_kept_counts
# ------------------------------------------------------------------------------------------------------------------
def test_random_dynamic_fixed_ratio():
    s = RandomDynamic(1001, prune_ratio=0.3, seed=1)
    plans = [s.plan_epoch(e) for e in range(3)]
    for p in plans:
        check_plan_contract(p, 1001)
        assert p.kept.size == round(0.7 * 1001) and not p.record_losses
    assert not np.array_equal(plans[0].kept, plans[1].kept)
    np.testing.assert_array_equal(RandomDynamic(1001, 0.3, seed=1).plan_epoch(2).kept, plans[2].kept)


def _write_log(tmp_path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_random_dynamic_matches_recorded_run(tmp_path):
    n = 5000
    counts = [5000, 5000, 5000, 3210, 3377, 3150, 4999, 1]
    rows = [{"train_loss": 0.5, "epoch": e, "kept": c, "n_parameters": 1} for e, c in enumerate(counts)]
    rows.insert(1, {"epoch": 1, "kept": 17})  # epoch 1 logged twice (a resumed run): the later line wins
    run = _write_log(tmp_path, rows, extra_lines=[""])
    got = read_kept_counts(run)
    assert got == counts
    s = RandomDynamic(n, seed=3, kept_counts=got)
    for epoch, c in enumerate(counts):
        plan = s.plan_epoch(epoch)
        check_plan_contract(plan, n)
        assert plan.kept.size == c
        assert s.end_epoch(epoch, None)["kept"] == c
    with pytest.raises(ValueError, match="epoch 8"):
        s.plan_epoch(len(counts))
    assert_resume_equal(lambda: RandomDynamic(n, seed=3, kept_counts=got), total=len(counts), split=3)


def test_read_kept_counts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="log.txt"):
        read_kept_counts(tmp_path)
    _write_log(tmp_path, [{"epoch": 0, "kept": 10}, {"epoch": 1, "train_loss": 0.3}])
    with pytest.raises(ValueError, match=r"log.txt:2: missing field 'kept'"):
        read_kept_counts(tmp_path)
    _write_log(tmp_path, [{"epoch": 0, "kept": 10}, {"epoch": 3, "kept": 9}, {"epoch": 5, "kept": 9}])
    with pytest.raises(ValueError, match=r"epochs 1, 2, 4 are missing"):
        read_kept_counts(tmp_path)
    _write_log(tmp_path, [{"epoch": 0, "kept": 10}], extra_lines=["not json"])
    with pytest.raises(ValueError, match=r"log.txt:2: not a JSON line"):
        read_kept_counts(tmp_path)
    _write_log(tmp_path, [{"epoch": 0, "kept": 10.5}])
    with pytest.raises(ValueError, match=r"'kept' must be an integer"):
        read_kept_counts(tmp_path)
    _write_log(tmp_path, [], extra_lines=[""])
    with pytest.raises(ValueError, match="no epoch lines"):
        read_kept_counts(tmp_path)


def test_random_dynamic_rejects_bad_counts():
    with pytest.raises(ValueError, match="kept_counts"):
        RandomDynamic(10, kept_counts=[10, 11])


def test_state_dicts_are_plain_data():
    factories = (lambda: NoPruning(5), lambda: InfoBatch(5, 4), lambda: SeTa(5, 4),
                 lambda: RandomDynamic(5, kept_counts=[3, 4]))
    for make in factories:
        s = make()
        drive(s, range(2))
        # weights_only=True raises on numpy arrays or custom objects.
        make().load_state_dict(roundtrip(s.state_dict()))
    with pytest.raises(ValueError, match="num_samples"):
        InfoBatch(6, 4).load_state_dict(InfoBatch(5, 4).state_dict())
    with pytest.raises(ValueError, match="strategy"):
        SeTa(5, 4).load_state_dict(InfoBatch(5, 4).state_dict())
