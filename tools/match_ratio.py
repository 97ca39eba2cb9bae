#!/usr/bin/env python
"""Flags that make a fixed-ratio baseline realise the prune ratio of a recorded D3P run (equal-ratio comparison).

    python tools/match_ratio.py infobatch --target OUT/d3p_seed0/pretrain --calibration OUT/infobatch_seed0/pretrain
    python tools/match_ratio.py dynunc --target OUT/d3p_seed0/pretrain --epochs 30 --static_warmup_epochs 5

prints the flags (e.g. `--prune_ratio 0.1803`) and, with --out FILE, writes them with the target and the model's
prediction as JSON (tools/reproduce_table1.sh keeps it as OUT/<arm>_eq_seed<S>/ratio_match.json, which
tools/make_table.py reads to mark the row as "at D3P's ratio").

Prune ratio = 1 - trained / (E * N). What each method realises at its flag r (epochs e = 0..E-1):
  * random: round((1-r) N) per epoch -> r.
  * dynunc, d2 (static): J full-data warm-up epochs, then round((1-r) N) -> r (E-J)/E, so r = target E / (E-J).
  * infobatch: epoch e < A = ceil(delta E) prunes each below-mean sample with probability r, so it realises
    (r/E) sum_{e<A} b_e, b_e = the fraction of samples below the mean score in epoch e (0 in epoch 0, where all
    scores are equal). b_e is not known before training; it is read from a calibration run (the default-ratio
    InfoBatch arm of the same seed logs it as infobatch_below_mean_fraction), so r = target E / sum b_e. First
    order only: b_e itself moves a little with r (pruned samples keep stale scores), so the realised ratio lands
    near, not on, the target; the table prints the realised one.
  * seta: a random (1-r) N subset, of which the window keeps a share w_e (epoch 0 and e >= A: all). It realises
    1 - (1-r) mean_e w_e, with w_e = kept_e / subset size from a calibration run (the default SeTa arm), so
    r = 1 - (1-target) / mean w. When even r = 0 prunes more than the target (a window of half the groups drops
    about half the data), r = 0 and the window is widened: the share of a window is interpolated between the
    calibration width and the whole window (which keeps everything), w_e(s) = w_e + (1 - w_e)(s - s0)/(1 - s0),
    and the width of 1..G-1 whole groups (SeTa's window; a target above 0 must leave a group out) nearest the
    target is taken. One group is SeTa's step, so the realised ratio can land a few points from the target.
A target the method cannot reach (r >= 1) is an error that names the largest reachable ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d3p.methods.common import anneal_start as anneal_epoch, kept_size  # noqa: E402  (the strategies' own rules)
from d3p.registry import methods  # noqa: E402

# methods with a model of their own below; every static method of the registry shares the static one
DYNAMIC_MODELS = ("infobatch", "seta", "random")


def static_methods() -> tuple[str, ...]:
    """The registry's static selectors with the warm-up frame's options (J full epochs, then round((1-r) N))."""
    return tuple(m.name for m in methods("static") if {"prune_ratio", "static_warmup_epochs"} <= set(m.option_names()))


def solvable_methods() -> tuple[str, ...]:
    return DYNAMIC_MODELS + static_methods()


class RatioError(ValueError):
    """The target ratio is out of the method's reach, or the inputs do not describe the runs."""


def _check_target(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise RatioError(f"target prune ratio must lie in [0, 1), got {target}")


def static_ratio(target: float, num_epochs: int, warmup_epochs: int) -> float:
    """Dyn-Unc / D2: r with r (E - J) / E = target."""
    _check_target(target)
    if not 1 <= warmup_epochs < num_epochs:
        raise RatioError(f"warm-up epochs must lie in [1, {num_epochs}), got {warmup_epochs}")
    r = target * num_epochs / (num_epochs - warmup_epochs)
    if r >= 1.0:
        raise RatioError(f"a static selector with {warmup_epochs} full warm-up epochs of {num_epochs} prunes at most "
                         f"{(num_epochs - warmup_epochs) / num_epochs:.1%}; target {target:.1%} is out of reach")
    return r


def infobatch_ratio(target: float, below_mean_fractions: Sequence[float], num_epochs: int, delta: float) -> float:
    """InfoBatch: r with (r / E) * sum_{e < ceil(delta E)} b_e = target.

    below_mean_fractions: b_e per 0-based epoch (at least the pruning epochs), from a calibration run.
    """
    _check_target(target)
    a = anneal_epoch(num_epochs, delta)
    if len(below_mean_fractions) < a:
        raise RatioError(f"the calibration run covers {len(below_mean_fractions)} epochs, InfoBatch prunes in "
                         f"epochs 0..{a - 1}: calibrate with a run of the same --epochs and --delta")
    mass = float(sum(below_mean_fractions[:a]))
    if target == 0.0:
        return 0.0
    if mass <= 0.0:
        raise RatioError("the calibration run never had a sample below the mean score: InfoBatch cannot prune")
    r = target * num_epochs / mass
    if r >= 1.0:
        raise RatioError(f"InfoBatch prunes at most {mass / num_epochs:.1%} (r -> 1) with these below-mean fractions;"
                         f" target {target:.1%} is out of reach")
    return r


def window_share(share: float, scale: float, calibration_scale: float) -> float:
    """The share of SeTa's random subset a window of `scale` keeps, from the share it kept at the calibration
    width: interpolated between (calibration_scale, share) and the whole window (1, 1), which keeps all."""
    if scale == calibration_scale or calibration_scale >= 1.0:
        return min(1.0, share)
    return min(1.0, share + (1.0 - share) * (scale - calibration_scale) / (1.0 - calibration_scale))


def seta_flags(target: float, window_shares: Sequence[float], num_epochs: int, delta: float, groups: int,
               window_scale: float) -> tuple[float, float]:
    """SeTa: (r, window_scale) realising `target`.

    window_shares: w_e per 0-based epoch from a calibration run at `window_scale`: the share of the epoch's random
    subset that the window kept (1 in epoch 0 and from ceil(delta E) on).
    """
    _check_target(target)
    a = anneal_epoch(num_epochs, delta)
    if len(window_shares) < num_epochs:
        raise RatioError(f"the calibration run covers {len(window_shares)} of {num_epochs} epochs: calibrate with a "
                         "finished SeTa run of the same --epochs and --delta")
    shares = [float(w) for w in window_shares[:num_epochs]]
    mean_share = sum(shares) / num_epochs
    r = 1.0 - (1.0 - target) / mean_share
    if r >= 0.0:
        return r, window_scale
    # r = 0 still prunes too much: widen the window. Share of pruned epoch e at width s, interpolated between the
    # calibration (s0, w_e) and the whole window (1, 1), which keeps everything: w_e + (1 - w_e)(s - s0)/(1 - s0).
    # SeTa's window is a whole number of groups, and a target above 0 needs at least one group left out, so the
    # width is the one of 1..G-1 groups whose modelled share is nearest the target's.
    pruned_epochs = [e for e in range(1, min(a, num_epochs))]
    full = num_epochs - len(pruned_epochs)
    need = (1.0 - target) * num_epochs - full  # sum of the pruned epochs' shares

    def modelled(scale: float) -> float:
        return sum(window_share(shares[e], scale, window_scale) for e in pruned_epochs)

    widths = range(max(1, round(groups * window_scale)), max(groups - 1, 1) + 1)
    width = min(widths, key=lambda w: abs(modelled(w / groups) - need))
    return 0.0, width / groups


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise RatioError(f"{path} does not exist: the run has not finished")
    with open(path) as f:
        return json.load(f)


def _read_log(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "log.txt")
    if not os.path.isfile(path):
        raise RatioError(f"{path} does not exist: pass the pre-training folder of a finished calibration run")
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[int(row["epoch"])] = row  # a replayed epoch: the last line wins
    return [rows[e] for e in sorted(rows)]


def solve(method: str, target_run: str, calibration: str | None, epochs: int | None, warmup: int) -> dict[str, Any]:
    """The flags for `method` at the prune ratio of `target_run` (a finished pre-training folder)."""
    target_summary = _read_json(os.path.join(target_run, "summary.json"))
    target = float(target_summary["prune_ratio"])
    out: dict[str, Any] = {"method": method, "target_ratio": target, "target_run": os.path.abspath(target_run)}
    if method in ("infobatch", "seta"):
        if not calibration:
            raise RatioError(f"{method} needs --calibration: a finished {method} run of the same --epochs (e.g. the "
                             "default-ratio arm of the same seed)")
        cal = _read_json(os.path.join(calibration, "summary.json"))
        flags = cal.get("flags") or {}
        n_ep, delta = int(cal["epochs"]), float(flags.get("delta", 0.875))
        log = _read_log(calibration)
        out["calibration_run"] = os.path.abspath(calibration)
        if method == "infobatch":
            fractions = [float(r.get("infobatch_below_mean_fraction", 0.0)) for r in log]
            r = infobatch_ratio(target, fractions, n_ep, delta)
            out["flags"] = {"prune_ratio": r}
            out["predicted_ratio"] = r * sum(fractions[:anneal_epoch(n_ep, delta)]) / n_ep
        else:
            n, r0 = int(cal["num_samples"]), float(flags["prune_ratio"])
            subset = kept_size(n, r0)
            shares = [float(r["kept"]) / subset for r in log]
            groups, scale0 = int(flags.get("seta_groups", 10)), float(flags.get("seta_window_scale", 0.5))
            r, scale = seta_flags(target, shares, n_ep, delta, groups, scale0)
            out["flags"] = {"prune_ratio": r, "seta_window_scale": scale}
            a = anneal_epoch(n_ep, delta)
            # kept fraction per epoch: all in epoch 0 and from the anneal epoch on, else (1 - r) x the window's share
            kept = [1.0 if (e == 0 or e >= a) else (1.0 - r) * window_share(w, scale, scale0)
                    for e, w in enumerate(shares[:n_ep])]
            out["predicted_ratio"] = 1.0 - sum(kept) / n_ep
    elif method in static_methods():
        n_ep = int(epochs or target_summary["epochs"])
        r = static_ratio(target, n_ep, warmup)
        out["flags"] = {"prune_ratio": r, "static_warmup_epochs": warmup}
        out["predicted_ratio"] = r * (n_ep - warmup) / n_ep
    elif method == "random":
        out["flags"] = {"prune_ratio": target}
        out["predicted_ratio"] = target
    else:
        raise RatioError(f"unknown method {method}; choose one of {', '.join(solvable_methods())}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Flags that make a fixed-ratio baseline realise a D3P run's prune ratio")
    p.add_argument("method", choices=solvable_methods())
    p.add_argument("--target", required=True, metavar="RUN_DIR", help="finished D3P pre-training folder")
    p.add_argument("--calibration", default=None, metavar="RUN_DIR",
                   help="infobatch/seta: a finished run of that method with the same --epochs/--delta")
    p.add_argument("--epochs", type=int, default=None, help="dynunc/d2: pre-training epochs (default: the target's)")
    p.add_argument("--static_warmup_epochs", type=int, default=10, help="dynunc/d2: J")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    try:
        result = solve(args.method, args.target, args.calibration, args.epochs, args.static_warmup_epochs)
    except RatioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(" ".join(f"--{k} {v!r}" for k, v in result["flags"].items()))  # exactly the values in --out
    print(f"{args.method}: target {result['target_ratio']:.4f}, predicted {result['predicted_ratio']:.4f}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
