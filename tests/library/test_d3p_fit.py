"""D3P's fit diagnostic and safety rails (docs/supervised.md): the KS distance between the observed CLD and the
ideal distribution, silent on MAE's losses and loud on a noisy classifier's cross-entropy; the weight cap, the
kept floor and the poor-fit actions; the classification presets; the MAE defaults unchanged."""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import numpy as np
import pytest

import d3p
from d3p.methods.d3p import D3P
from d3p.schedule import D3PSchedule
from d3p.stats import FIT_KS_THRESHOLD, D3PFitWarning, IdealCLDDensity, decide, fit_ks, ideal_cld_density
from d3p.strategy import EpochLosses
from conftest import REPO as ROOT
from util.label_noise import apply_label_noise, symmetric_label_noise

MAE_WINDOWS = os.path.join(ROOT, "tests", "data", "mae_digits_windows.npz")


def _uniform_density() -> IdealCLDDensity:
    """The uniform law on [0, 1] as 4 equal cells: its CDF is x on [0, 1]."""
    return IdealCLDDensity(mu=np.array([0.5]), var=np.array([0.1]), lo=0.0, width=0.25, mass=np.full(4, 0.25),
                           quantile=0.999, tail_bound=0.0)


def test_fit_ks_is_the_exact_kolmogorov_smirnov_distance():
    u = _uniform_density()
    assert fit_ks(np.full(10, 0.5), u) == 0.5  # a point mass at the median: sup |F_obs - F| = 1/2
    assert fit_ks(np.array([2.0, 3.0]), u) == 1.0  # no overlap
    # n equally spaced points at (i - 1/2)/n: the best n-point fit of the uniform, distance 1/(2n)
    assert fit_ks((np.arange(8) + 0.5) / 8, u) == pytest.approx(1 / 16, abs=1e-15)
    assert fit_ks(np.array([0.1, 0.2, 0.9]), u) == pytest.approx(max(1 / 3 - 0.0, 2 / 3 - 0.2, 0.9 - 2 / 3, 0.2))


def test_losses_drawn_from_the_model_fit():
    """The ideal model's own draws (MAE-like: sums of squared, roughly Gaussian errors) sit far below the
    threshold, and no warning is raised by the strategy."""
    rng = np.random.default_rng(3)
    window = (np.array([[0.8], [0.75], [0.72]]) + np.array([[0.12], [0.10], [0.11]]) *
              rng.standard_normal((3, 20_000))).astype(np.float32)
    ks = fit_ks(np.mean(window.astype(np.float64) ** 2, axis=0), ideal_cld_density(window))
    assert ks < 0.02
    d = _strategy(20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", D3PFitWarning)
        log = _decide_on(d, window)
    assert log["d3p_fit_ks"] == pytest.approx(ks, abs=1e-6) and "d3p_warning" not in log


def _strategy(n: int, **rails) -> D3P:
    return D3P(n, D3PSchedule(3, 5, 3, 10), bins=32, seed=0, min_kept=1, **rails)


def _decide_on(strategy: D3P, window: np.ndarray, epoch: int = 2) -> dict:
    for t, row in enumerate(window):
        strategy.window[t] = row
    return strategy._decide(epoch)


def test_stored_mae_windows_stay_silent():
    """Every decision of the MAE digits demo's pre-training (tests/data/make_mae_windows.py): its losses fit,
    no warning; the KS values are the MAE side of the threshold's calibration (docs/supervised.md)."""
    stored = np.load(MAE_WINDOWS)
    windows = stored["windows"]
    assert windows.shape[0] == 6 and windows.shape[1:] == (3, 1500)
    values = []
    for window in windows:
        with warnings.catch_warnings():
            warnings.simplefilter("error", D3PFitWarning)
            log = _decide_on(_strategy(1500), window)
        values.append(log["d3p_fit_ks"])
        assert "d3p_warning" not in log
    assert max(values) < FIT_KS_THRESHOLD / 1.5, values  # a margin, not a near miss


@pytest.fixture(scope="module")
def noisy_runs(tmp_path_factory):
    """The benchmark's MLP on the digits with 20% label noise, 8 epochs (decisions at epochs 3 and 8), D3P
    without and with the classification rails."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_mlp_digits

    out = tmp_path_factory.mktemp("noisy")
    return {arm: train_mlp_digits.run(arm, 0.2, 0, 8, str(out / arm)) for arm in ("d3p", "d3p_rails")}


def test_noisy_cross_entropy_warns_and_the_rails_act(noisy_runs):
    plain, rails = noisy_runs["d3p"], noisy_runs["d3p_rails"]
    assert len(plain["fit_ks"]) == 2 and min(plain["fit_ks"]) > 1.5 * FIT_KS_THRESHOLD
    assert plain["fit_warnings"] == 2 and rails["fit_warnings"] == 2  # one D3PFitWarning per decision
    assert plain["rails_acted"] == [] and plain["max_weight"] > 4.0  # published: uncapped up-weights
    assert rails["max_weight"] == 1.0  # the classification default: no up-weights
    assert len(rails["rails_acted"]) == 2 and all("up-weights capped at 1" in line for line in rails["rails_acted"])


def test_the_cap_bounds_every_weight_and_changes_nothing_else():
    window = _cross_entropy_window()
    free, capped = decide(window, bins=32, rng=0), decide(window, bins=32, rng=0, max_weight=2.0)
    assert free.weights.max() > 2.0
    assert capped.weights.max() <= 2.0 and capped.capped == int(np.sum(free.weights > 2.0)) > 0
    np.testing.assert_array_equal(capped.pruned, free.pruned)
    np.testing.assert_array_equal(capped.weights, np.minimum(free.weights, np.float32(2.0)))


def _cross_entropy_window(n: int = 4000, noise: float = 0.2) -> np.ndarray:
    """Cross-entropy-shaped losses: most near 0 (learned), a tail of mislabelled samples around 3."""
    rng = np.random.default_rng(7)
    bad = rng.random(n) < noise
    base = np.where(bad, rng.normal(3.0, 0.8, n).clip(0.2), rng.exponential(0.08, n))
    return (base[None, :] * (1 + 0.1 * rng.standard_normal((3, n)))).clip(1e-4).astype(np.float32)


def test_the_floor_holds_and_is_logged():
    window = _cross_entropy_window()
    free = _decide_on(_strategy(4000), window)
    assert free["d3p_decision_pruned"] > 0.5 * 4000  # the published decision keeps less than half
    floored = _strategy(4000, min_kept_share=0.6)
    with pytest.warns(D3PFitWarning, match="fits poorly"):
        log = _decide_on(floored, window)
    kept = int((~floored.pruned).sum())
    assert kept == math.ceil(0.6 * 4000)
    assert log["d3p_restored"] == kept - (4000 - free["d3p_decision_pruned"])
    assert f"{log['d3p_restored']} samples added back for --d3p_min_kept 0.6" in log["d3p_rails"]
    assert "--d3p_min_kept 0.6 (2400 samples)" in log["d3p_note"]


def test_poor_fit_actions():
    window = _cross_entropy_window()
    free = decide(window, bins=32, rng=0)
    assert free.poor_fit and free.hard > 0
    tail = decide(window, bins=32, rng=0, poor_fit="keep_tail")
    assert tail.tail_kept == free.hard and not tail.pruned[free.cld > free.support[1]].any()
    with pytest.warns(D3PFitWarning):  # the strategy logs the rail when it acts
        log = _decide_on(_strategy(4000, poor_fit="keep_tail"), window)
    assert log["d3p_tail_kept"] == free.hard and f"{free.hard} hard samples kept" in log["d3p_rails"]
    everything = decide(window, bins=32, rng=0, poor_fit="keep_all")
    assert not everything.pruned.any() and (everything.weights == 1).all() and "keep_all" in everything.reason
    # a fitting window is decided as usual whatever the action
    rng = np.random.default_rng(1)
    fitting = (0.8 + 0.1 * rng.standard_normal((3, 4000))).astype(np.float32)
    a, b = decide(fitting, bins=32, rng=0), decide(fitting, bins=32, rng=0, poor_fit="keep_all")
    assert not a.poor_fit and a.pruned.any()
    np.testing.assert_array_equal(a.pruned, b.pruned)


def test_defaults_are_the_rails_and_reconstruction_is_the_published_method():
    """Issue 29 item 6: a DataPruner without loss_kind gets the rails (the classification preset); declaring
    MAE's reconstruction loss gives the published method."""
    safe = d3p.DataPruner(100, "d3p", epochs=10)
    assert safe.loss_kind == "classification"
    assert safe.strategy.max_weight == 1.0 and safe.strategy.min_kept_share == 0.7
    assert safe.options["d3p_max_weight"] == 1.0  # summary.json's flags say so
    mae = d3p.DataPruner(100, "d3p", epochs=10, loss_kind="reconstruction")
    assert (mae.strategy.max_weight, mae.strategy.min_kept_share, mae.strategy.poor_fit) == (0.0, 0.0, "warn")
    own = d3p.DataPruner(100, "d3p", epochs=10, d3p_max_weight=0.0)
    assert own.strategy.max_weight == 0.0  # an explicit option wins over the preset
    with pytest.raises(ValueError, match="loss_kind must be one of"):
        d3p.DataPruner(100, "d3p", epochs=10, loss_kind="regression")
    # the flags: the MAE pre-training script keeps the published defaults, main_finetune.py the rails
    import main_finetune
    import main_pretrain_d3p

    pre = main_pretrain_d3p.get_args_parser().parse_args([])
    ft = main_finetune.get_args_parser().parse_args([])
    assert (pre.d3p_max_weight, pre.d3p_min_kept, pre.d3p_poor_fit) == (0.0, 0.0, "warn")
    assert (ft.d3p_max_weight, ft.d3p_min_kept) == (1.0, 0.7)
    parser = argparse.ArgumentParser()
    d3p.add_pruning_args(parser)  # the flags' default is the safe one too
    assert parser.parse_args([]).d3p_max_weight == 1.0
    assert d3p.DataPruner.from_args(pre, 100).strategy.max_weight == 0.0  # the MAE script: the published method
    assert "must be 0 (no cap) or >= 1" in "; ".join(
        d3p.validate_pruning_args(parser.parse_args(["--d3p_max_weight", "0.5"])))


def test_the_rails_at_their_defaults_leave_the_decision_unchanged_bit_for_bit():
    window = _cross_entropy_window()
    plain = decide(window, bins=32, rng=3, min_kept=10)
    explicit = decide(window, bins=32, rng=3, min_kept=10, max_weight=0.0, poor_fit="warn", fit_threshold=0.999)
    for field in ("pruned", "weights", "cld", "support", "observed", "expected"):
        np.testing.assert_array_equal(getattr(plain, field), getattr(explicit, field))
    assert plain.capped == plain.tail_kept == 0


def test_symmetric_label_noise_is_exact_seeded_and_never_the_true_class():
    targets = np.arange(1000) % 10
    noisy, bad = symmetric_label_noise(targets, 10, 0.2, seed=4)
    assert bad.sum() == 200 and (noisy[bad] != targets[bad]).all() and (noisy[~bad] == targets[~bad]).all()
    again, _ = symmetric_label_noise(targets, 10, 0.2, seed=4)
    other, _ = symmetric_label_noise(targets, 10, 0.2, seed=5)
    np.testing.assert_array_equal(noisy, again)
    assert (other != noisy).any()
    assert np.bincount(noisy[bad], minlength=10).min() > 0  # every class receives wrong labels

    class Folder:  # an ImageFolder's fields
        classes = ["a", "b", "c"]
        targets = [0, 1, 2, 0]
        samples = [("x0", 0), ("x1", 1), ("x2", 2), ("x3", 0)]

    folder = Folder()
    mask = apply_label_noise(folder, 0.5, seed=0)
    assert mask.sum() == 2 and [t for _, t in folder.samples] == folder.targets
    with pytest.raises(ValueError, match="must lie in"):
        symmetric_label_noise(targets, 10, 1.0)


def test_the_epoch_and_the_run_prune_ratio():
    ledger = d3p.CostLedger(100)
    ledger.record_epoch(0, 100, 0, 1, 1.0, 0.0, kept=100)
    log = ledger.record_epoch(1, 40, 0, 1, 1.0, 0.0, kept=40)
    assert log["epoch_prune_ratio"] == 0.6 and log["run_prune_ratio"] == 1 - 140 / 200 and "prune_ratio" not in log
    assert ledger.summary()["prune_ratio"] == 1 - 140 / 200  # summary.json: the run's figure


def test_main_finetune_label_noise_flag(tmp_path):
    import main_finetune

    def args(*argv):
        a = main_finetune.get_args_parser().parse_args(["--model", "vit_tiny_patch4", "--input_size", "16",
                                                        "--num_workers", "0", "--output_dir", str(tmp_path), *argv])
        main_finetune.resolve_defaults(a)
        return a

    with pytest.raises(main_finetune.ConfigError, match="--label_noise 1.0 must lie in"):
        main_finetune.validate_args(args("--label_noise", "1.0"))
    clean = main_finetune.build_loaders(args())[0]
    noisy = main_finetune.build_loaders(args("--label_noise", "0.2", "--seed", "3"))[0]
    bad = np.load(tmp_path / "mislabelled.npy")
    expect, mask = symmetric_label_noise(clean.base.targets, 10, 0.2, seed=3)
    np.testing.assert_array_equal(bad, mask)
    assert bad.sum() == 300 and noisy.base.targets == expect.tolist()
    assert noisy[int(np.flatnonzero(bad)[0])][1] != clean[int(np.flatnonzero(bad)[0])][1]  # the items carry it


# ------------------------------------------------------------------ issue 29 item 8: the mutants that survived
def test_poor_fit_starts_strictly_above_the_threshold():
    """A fit exactly at the threshold is not poor (`ks > threshold`): keep_all then prunes as much as warn."""
    window = _cross_entropy_window()
    d = decide(window, bins=32, rng=3)
    at = decide(window, bins=32, rng=3, fit_threshold=d.fit_ks, poor_fit="keep_all")
    assert d.pruned.sum() > 0 and not at.poor_fit
    np.testing.assert_array_equal(at.pruned, d.pruned)


def test_the_fit_threshold_reaches_the_strategy():
    """DataPruner(d3p_fit_threshold=0.99): no D3PFitWarning on the cross-entropy window that warns at 0.2."""
    window = _cross_entropy_window()
    for threshold, warns in ((0.99, False), (FIT_KS_THRESHOLD, True)):
        strategy = d3p.DataPruner(4000, "d3p", epochs=10, d3p_start=3, d3p_period=5, d3p_window=3, d3p_bins=32,
                                  d3p_fit_threshold=threshold).strategy
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _decide_on(strategy, window)
        assert any(issubclass(w.category, D3PFitWarning) for w in caught) == warns, threshold


def test_the_kept_share_is_rounded_up():
    """d3p_min_kept=0.6 of N=4001 keeps ceil(2400.6) = 2401 when the decision falls below it."""
    window = _cross_entropy_window(4001)
    assert decide(window, bins=32, rng=0).pruned.sum() > 4001 - 2401  # the decision alone keeps fewer
    strategy = d3p.DataPruner(4001, "d3p", epochs=10, d3p_start=3, d3p_period=5, d3p_window=3, d3p_bins=32,
                              d3p_min_kept=0.6, d3p_max_weight=0.0).strategy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", D3PFitWarning)
        _decide_on(strategy, window)
    assert int((~strategy.pruned).sum()) == 2401
