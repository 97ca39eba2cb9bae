"""tools/match_ratio.py: flags that make the fixed-ratio baselines realise a D3P run's prune ratio."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from d3p.methods.infobatch import InfoBatch
from d3p.methods.seta import SeTa
from d3p.strategy import EpochLosses

from conftest import REPO as ROOT  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "tools"))
import match_ratio  # noqa: E402


def _run_strategy(strategy, losses: np.ndarray, epochs: int) -> tuple[float, list[dict]]:
    """Drive a loss-scored strategy with fixed per-sample losses; (realised prune ratio, end_epoch logs)."""
    n = losses.size
    trained, logs = 0, []
    for e in range(epochs):
        plan = strategy.plan_epoch(e)
        trained += plan.kept.size
        seen = np.zeros(n, dtype=bool)
        seen[plan.kept] = True
        logs.append(strategy.end_epoch(e, EpochLosses(np.where(seen, losses, 0.0), seen.astype(np.float64))))
    return 1.0 - trained / (epochs * n), logs


@pytest.fixture
def skewed_losses():
    return np.random.default_rng(0).exponential(size=20000)  # ~63% of the samples lie below the mean


def test_infobatch_solved_ratio_is_realised(skewed_losses):
    n, epochs, delta = skewed_losses.size, 10, 0.875
    realised_default, logs = _run_strategy(InfoBatch(n, epochs, 0.5, delta, seed=0), skewed_losses, epochs)
    fractions = [log["infobatch_below_mean_fraction"] for log in logs]
    assert realised_default < 0.5  # InfoBatch realises less than its r
    for target in (0.1, 0.2, 0.3):
        r = match_ratio.infobatch_ratio(target, fractions, epochs, delta)
        assert r > target
        realised, _ = _run_strategy(InfoBatch(n, epochs, r, delta, seed=1), skewed_losses, epochs)
        assert realised == pytest.approx(target, abs=0.003)
    with pytest.raises(match_ratio.RatioError, match="prunes at most"):
        match_ratio.infobatch_ratio(0.6, fractions, epochs, delta)
    with pytest.raises(match_ratio.RatioError, match="covers 3 epochs"):
        match_ratio.infobatch_ratio(0.1, fractions[:3], epochs, delta)


def test_seta_solved_flags_are_realised(skewed_losses):
    n, epochs, delta = skewed_losses.size, 16, 0.875
    default, logs = _run_strategy(SeTa(n, epochs, 0.5, 10, 0.5, delta, seed=0), skewed_losses, epochs)
    shares = [log["kept"] / (n // 2) for log in logs]
    # reachable by r alone (window 0.5)
    r, scale = match_ratio.seta_flags(0.8, shares, epochs, delta, 10, 0.5)
    assert scale == 0.5 and 0.5 < r < 1
    realised, _ = _run_strategy(SeTa(n, epochs, r, 10, scale, delta, seed=1), skewed_losses, epochs)
    assert realised == pytest.approx(0.8, abs=0.02)  # first-order model: unscored samples shift group shares
    # below SeTa's floor at window 0.5: r = 0 and a wider window (a whole number of groups)
    r, scale = match_ratio.seta_flags(0.1, shares, epochs, delta, 10, 0.5)
    assert r == 0.0 and scale in (0.8, 0.9)  # a target above 0 leaves a group out: never the whole window
    realised, _ = _run_strategy(SeTa(n, epochs, r, 10, scale, delta, seed=1), skewed_losses, epochs)
    assert abs(realised - 0.1) < abs(default - 0.1) / 4


def test_static_ratio_closed_form():
    assert match_ratio.static_ratio(0.09, 30, 5) == pytest.approx(0.09 * 30 / 25)
    with pytest.raises(match_ratio.RatioError, match="prunes at most 83.3%"):
        match_ratio.static_ratio(0.9, 30, 5)


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if isinstance(data, list):
            f.write("".join(json.dumps(row) + "\n" for row in data))
        else:
            json.dump(data, f)


def test_cli_reads_the_target_and_calibration_runs(tmp_path, capsys):
    d3p, ib = str(tmp_path / "d3p"), str(tmp_path / "ib")
    _write(os.path.join(d3p, "summary.json"), {"prune_ratio": 0.12, "epochs": 8})
    _write(os.path.join(ib, "summary.json"), {"epochs": 8, "num_samples": 100, "flags": {"prune_ratio": 0.5,
                                                                                          "delta": 0.875}})
    _write(os.path.join(ib, "log.txt"), [{"epoch": e, "kept": 70, "infobatch_below_mean_fraction": 0.0 if e == 0
                                          else 0.6} for e in range(8)])
    out = str(tmp_path / "eq" / "ratio_match.json")
    assert match_ratio.main(["infobatch", "--target", d3p, "--calibration", ib, "--out", out]) == 0
    # epochs 0..6 prune (ceil(0.875 * 8) = 7), 6 of them with b = 0.6: r = 0.12 * 8 / 3.6; printed exactly as saved
    saved = json.load(open(out))
    assert capsys.readouterr().out.strip() == f"--prune_ratio {saved['flags']['prune_ratio']!r}"
    assert saved["flags"]["prune_ratio"] == pytest.approx(0.12 * 8 / 3.6, rel=1e-12)
    assert saved["target_ratio"] == 0.12 and saved["predicted_ratio"] == pytest.approx(0.12)
    assert match_ratio.main(["dynunc", "--target", d3p, "--static_warmup_epochs", "2"]) == 0
    flags = capsys.readouterr().out.split()
    assert flags[0] == "--prune_ratio" and float(flags[1]) == pytest.approx(0.16, rel=1e-12)
    assert flags[2:] == ["--static_warmup_epochs", "2"]
    assert match_ratio.main(["seta", "--target", d3p]) == 1
    assert "seta needs --calibration" in capsys.readouterr().err


def test_whole_eqc_epoch_arithmetic():
    n, e = 1500, 20
    # D3P-like target: 27,360 trained + 1,000 forward-only (1/3 each) = 18.46 epochs of whole data -> 18
    assert match_ratio.equal_compute_epochs(27360 + 1000 / 3, n, e) == 18
    assert match_ratio.equal_compute_epochs(18.5 * n, n, e) == 19  # half up, not Python's half to even
    assert match_ratio.equal_compute_epochs(17.5 * n, n, e) == 18
    assert match_ratio.equal_compute_epochs(0.2 * n, n, e) == 1  # never fewer than one epoch
    assert match_ratio.equal_compute_epochs(e * n + 5000, n, e) == e  # never more than the full run
    for cost in (0.3 * e * n, 27693.0, 1234.5 * 7):
        assert abs(match_ratio.equal_compute_epochs(cost, n, e) * n - cost) <= n / 2  # within half an epoch
    # warm-up compressed with the run, at most E' - 1 epochs
    assert match_ratio.compressed_warmup(3, 20, 18) == 3  # 2.7
    assert match_ratio.compressed_warmup(40, 800, 400) == 20  # MAE's 40 of 800 at half the compute
    assert match_ratio.compressed_warmup(5, 10, 3) == 2  # 1.5 half up
    assert match_ratio.compressed_warmup(3, 4, 2) == 1  # 1.5 -> 2, capped at E' - 1
    assert match_ratio.compressed_warmup(0, 20, 5) == 0
    with pytest.raises(match_ratio.RatioError):
        match_ratio.equal_compute_epochs(0.0, n, e)


def test_whole_eqc_and_rs2_from_a_run_or_a_ratio(tmp_path, capsys):
    d3p = str(tmp_path / "d3p")
    _write(os.path.join(d3p, "summary.json"), {"prune_ratio": 0.088, "epochs": 80, "num_samples": 1500,
                                               "samples_trained": 109_000, "samples_forward_only": 3_000})
    out = str(tmp_path / "eqc" / "ratio_match.json")
    assert match_ratio.main(["whole_eqc", "--target", d3p, "--warmup_epochs", "4", "--out", out]) == 0
    # compute 109,000 + 1,000 = 110,000 samples = 73.33 epochs of 1,500 -> 73; warm-up 4 * 73 / 80 = 3.65 -> 4
    assert capsys.readouterr().out.split() == ["--epochs", "73", "--warmup_epochs", "4"]
    saved = json.load(open(out))
    assert saved["flags"] == {"epochs": 73, "warmup_epochs": 4} and saved["target_run"] == os.path.abspath(d3p)
    assert saved["target_ratio"] == 0.088 and saved["full_epochs"] == 80
    assert saved["target_cost_epochs"] == pytest.approx(110_000 / 1500, rel=1e-12)
    # the sweep: a ratio target, the run length from --epochs
    assert match_ratio.main(["whole_eqc", "--target", "0.3", "--epochs", "80", "--warmup_epochs", "4"]) == 0
    assert capsys.readouterr().out.split() == ["--epochs", "56", "--warmup_epochs", "3"]  # 4 * 56 / 80 = 2.8
    assert match_ratio.main(["rs2", "--target", d3p]) == 0
    assert capsys.readouterr().out.split() == ["--prune_ratio", "0.088"]
    assert match_ratio.main(["d2", "--target", "0.5", "--epochs", "80", "--static_warmup_epochs", "5"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["--prune_ratio", repr(0.5 * 80 / 75)]
    assert match_ratio.main(["whole_eqc", "--target", "0.3", "--warmup_epochs", "4"]) == 1
    assert "pass --epochs" in capsys.readouterr().err
    assert match_ratio.main(["whole_eqc", "--target", d3p]) == 1
    assert "needs --warmup_epochs" in capsys.readouterr().err
    assert match_ratio.main(["rs2", "--target", "nonsense"]) == 1
    assert "neither a folder nor a prune ratio" in capsys.readouterr().err


def test_d3p_orderdp_and_random_static_at_a_ratio(capsys):
    # D3P (s=3, p=5, n=2, 80 epochs): the first decision ends epoch 2, so 77 epochs are pruned: r = t 80 / 77
    assert match_ratio.d3p_pruned_epochs(80, 3, 5, 2) == 77
    assert match_ratio.d3p_pruned_epochs(80, 3, 5, 2, anneal_epochs=7) == 70
    out = match_ratio.solve("d3p", "0.5", None, 80, 5, d3p_schedule=(3, 5, 2, 0))
    assert out["flags"] == {"d3p_target_ratio": 0.5 * 80 / 77} and out["predicted_ratio"] == pytest.approx(0.5)
    with pytest.raises(match_ratio.RatioError, match="out of reach"):
        match_ratio.solve("d3p", "0.5", None, 6, 5, d3p_schedule=(3, 5, 2, 0))  # 3 of 6 epochs pruned: at most 50%
    assert match_ratio.solve("orderdp", "0.3", None, 80, 5)["flags"] == {"orderdp_target_ratio": 0.3}
    with pytest.raises(match_ratio.RatioError, match="out of reach"):
        match_ratio.solve("orderdp", "0.0", None, 80, 5)
    static = match_ratio.solve("random_static", "0.7", None, 80, 5)  # the static selectors' model
    assert static["flags"] == {"prune_ratio": 0.7 * 80 / 75, "static_warmup_epochs": 5}
    assert match_ratio.main(["d3p", "--target", "0.3", "--epochs", "80", "--d3p_start", "3", "--d3p_period", "5",
                             "--d3p_window", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"--d3p_target_ratio {0.3 * 80 / 77!r}"


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_d3p_by_compute_saves_the_target_share_of_the_compute(target):
    """The sweep's D3P arm (--by_compute): r from the model r (P - F/3) / E = target, then the real strategy's
    plans over 80 epochs (s=3, p=5, n=2), charged like the ledger (a trained sample 1, a forward-only one 1/3),
    save the target share of the compute; the plain ratio solve would save less (its forward-only passes)."""
    from d3p.ledger import FORWARD_ONLY_COST
    from d3p.methods.d3p import D3P
    from d3p.schedule import D3PSchedule

    assert match_ratio.d3p_recording_pruned_epochs(80, 3, 5, 2) == 30  # 2 of every 5 pruned epochs record
    out = match_ratio.solve("d3p", str(target), None, 80, 5, d3p_schedule=(3, 5, 2, 0), by_compute=True)
    r = out["flags"]["d3p_target_ratio"]
    assert r == pytest.approx(target * 80 / (77 - 30 / 3)) and out["target"] == "compute_saved"
    n, epochs, rng = 1500, 80, np.random.default_rng(0)
    base = rng.lognormal(0.0, 0.4, n)
    s = D3P(n, D3PSchedule(start=3, period=5, window=2, epochs=epochs), bins=32, seed=0, target_ratio=r)
    cost = 0.0
    for epoch in range(epochs):
        plan = s.plan_epoch(epoch)
        cost += plan.kept.size + FORWARD_ONLY_COST * plan.forward_only.size
        losses = None
        if plan.record_losses:
            loss = base * (0.98 ** epoch) * rng.lognormal(0.0, 0.05, n)
            losses = EpochLosses(loss, np.ones(n, dtype=np.int32))
        s.end_epoch(epoch, losses)
    saved = 1.0 - cost / (n * epochs)
    assert abs(saved - target) <= 0.005, saved
    plain = match_ratio.solve("d3p", str(target), None, 80, 5, d3p_schedule=(3, 5, 2, 0))
    assert plain["flags"]["d3p_target_ratio"] < r  # by ratio it prunes less and saves less than the target
    with pytest.raises(match_ratio.RatioError, match="out of reach"):
        match_ratio.solve("d3p", "0.84", None, 80, 5, d3p_schedule=(3, 5, 2, 0), by_compute=True)  # 67/80 at most
    with pytest.raises(match_ratio.RatioError, match="--by_compute is for d3p"):
        match_ratio.solve("rs2", "0.5", None, 80, 5, by_compute=True)
