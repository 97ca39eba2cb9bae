#!/usr/bin/env python
"""Flags that make a fixed-ratio baseline realise the prune ratio of a recorded D3P run (equal-ratio comparison).

    python tools/match_ratio.py infobatch --target OUT/d3p_seed0/pretrain --calibration OUT/infobatch_seed0/pretrain
    python tools/match_ratio.py dynunc --target OUT/d3p_seed0/pretrain --epochs 30 --static_warmup_epochs 5
    python tools/match_ratio.py whole_eqc --target OUT/d3p_seed0/pretrain --warmup_epochs 3
    python tools/match_ratio.py rs2 --target 0.5                     (a ratio instead of a run: the sweep)

prints the flags (e.g. `--prune_ratio 0.1803`) and, with --out FILE, writes them with the target and the model's
prediction as JSON (tools/reproduce_table1.sh keeps it as OUT/<arm>_eq_seed<S>/ratio_match.json, which
tools/make_table.py reads to mark the row as "at D3P's ratio").

--target is a finished D3P pre-training folder (its realised prune ratio and compute), or a prune ratio in [0, 1)
(the sweep of tools/reproduce_table1.sh; --epochs then gives the run length E).
Prune ratio = 1 - trained / (E * N). What each method realises at its flag r (epochs e = 0..E-1):
  * random: round((1-r) N) per epoch -> r.
  * rs2: chunks of round((1-r) N) per epoch, one sample fewer in the wrapping chunk of a pass -> r (+ < 1/(E N)
    per pass).
  * whole_eqc ("train less"): no pruning, E' = round(C / N) epochs, where C is the target's compute in samples
    (samples trained + forward-only samples / 3, the table's compute; for a ratio target (1 - t) E N), so that the
    whole data trained for fewer epochs costs what the pruned arm cost. The learning-rate schedule is compressed with
    it, as a user training less would: --warmup_epochs W' = round(W E' / E) (the cosine follows --epochs). One epoch
    is the step: E' lands within N / 2 samples of C.
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
  * orderdp: --orderdp_target_ratio r prunes round-to-nearest r of the samples in every epoch (it never anneals)
    -> r. A target of 0 is out of its reach (q = 1 is plain random).
  * d3p (this project's --d3p_target_ratio, docs/spec.md §6a): the epochs up to the first decision train on all
    data, then every decision keeps round((1-r) N) until the annealing epochs, so it realises r P / E with P the
    pruned epochs of its schedule (--d3p_start/--d3p_period/--d3p_window/--d3p_anneal_epochs, as the run's flags):
    r = target E / P. First order: a decision whose support holds fewer samples prunes more. With --by_compute the
    target is the compute saved: the recording epochs among the P run a forward-only pass over the pruned samples
    (FORWARD_ONLY_COST = 1/3 of a trained sample each), so r (P - F / 3) / E = target, F those epochs. The sweep's
    D3P arms use it: every arm of a sweep column then spends the same compute.
A target the method cannot reach (r >= 1) is an error that names the largest reachable ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d3p.ledger import FORWARD_ONLY_COST  # noqa: E402
from d3p.methods.common import anneal_start as anneal_epoch, kept_size  # noqa: E402  (the strategies' own rules)
from d3p.registry import methods  # noqa: E402
from util.run_folder import LOG_FILE, SUMMARY_FILE  # noqa: E402

# methods with a model of their own below; every static method of the registry shares the static one
DYNAMIC_MODELS = ("infobatch", "seta", "random", "rs2", "orderdp", "d3p")


def static_methods() -> tuple[str, ...]:
    """The registry's static selectors with the warm-up frame's options (J full epochs, then round((1-r) N))."""
    return tuple(m.name for m in methods("static") if {"prune_ratio", "static_warmup_epochs"} <= set(m.option_names()))


def solvable_methods() -> tuple[str, ...]:
    return DYNAMIC_MODELS + static_methods() + ("whole_eqc",)


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


def _d3p_pruned(num_epochs: int, start: int, period: int, window: int, anneal_epochs: int = 0):
    """(schedule, the epochs a D3P run trains on a decision's kept set: after the first decision, before annealing)."""
    from d3p.schedule import D3PSchedule

    schedule = D3PSchedule(start, period, window, num_epochs, anneal_epochs)
    decisions = schedule.decision_epochs()
    first = decisions[0] + 1 if decisions else num_epochs
    return schedule, [e for e in range(first, num_epochs) if not schedule.is_annealing(e)]


def d3p_pruned_epochs(num_epochs: int, start: int, period: int, window: int, anneal_epochs: int = 0) -> int:
    """How many epochs a D3P run trains on a decision's kept set."""
    return len(_d3p_pruned(num_epochs, start, period, window, anneal_epochs)[1])


def d3p_recording_pruned_epochs(num_epochs: int, start: int, period: int, window: int, anneal_epochs: int = 0) -> int:
    """The pruned epochs that are also recording epochs: D3P runs a forward-only pass over their pruned samples."""
    schedule, pruned = _d3p_pruned(num_epochs, start, period, window, anneal_epochs)
    return sum(1 for e in pruned if schedule.is_recording(e))


def d3p_compute_ratio(target: float, num_epochs: int, pruned_epochs: int, recording_pruned: int) -> float:
    """D3P at a target compute saving: r with r (P - c F) / E = target, c = FORWARD_ONLY_COST and F the pruned
    epochs that record (their pruned samples get a forward-only pass, a third of a trained sample each)."""
    _check_target(target)
    effective = pruned_epochs - FORWARD_ONLY_COST * recording_pruned
    reach = effective / num_epochs
    if target >= reach:
        raise RatioError(f"D3P saves at most {reach:.1%} of the compute with this schedule ({pruned_epochs} pruned "
                         f"epochs of {num_epochs}, {recording_pruned} of them with a forward-only pass); target "
                         f"{target:.1%} is out of reach")
    return target * num_epochs / effective


def d3p_ratio(target: float, num_epochs: int, pruned_epochs: int) -> float:
    """D3P at a target ratio: r with r P / E = target."""
    _check_target(target)
    reach = pruned_epochs / num_epochs
    if target >= reach:
        raise RatioError(f"D3P prunes in {pruned_epochs} of {num_epochs} epochs (after its first decision, before "
                         f"annealing), so at most {reach:.1%}; target {target:.1%} is out of reach")
    return target * num_epochs / pruned_epochs


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def equal_compute_epochs(target_cost: float, num_samples: int, epochs: int) -> int:
    """whole_eqc: E' = round(C / N) whole-data epochs costing the target's compute C (in samples), in [1, E]."""
    if num_samples < 1 or epochs < 1:
        raise RatioError(f"need num_samples >= 1 and epochs >= 1, got {num_samples}, {epochs}")
    if not 0.0 < target_cost <= epochs * num_samples * (1.0 + FORWARD_ONLY_COST):
        raise RatioError(f"target compute {target_cost} samples is not in (0, {epochs} x {num_samples} x 4/3]")
    return min(max(_round_half_up(target_cost / num_samples), 1), epochs)


def compressed_warmup(warmup_epochs: int, epochs: int, new_epochs: int) -> int:
    """whole_eqc: the warm-up scaled with the run, W' = round(W E' / E), at most E' - 1 (0 stays 0)."""
    if warmup_epochs < 0 or not 1 <= new_epochs <= epochs:
        raise RatioError(f"need warmup_epochs >= 0 and 1 <= new_epochs <= epochs, got {warmup_epochs}, "
                         f"{new_epochs}, {epochs}")
    return min(_round_half_up(warmup_epochs * new_epochs / epochs), max(new_epochs - 1, 0))


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
    path = os.path.join(run_dir, LOG_FILE)
    if not os.path.isfile(path):
        raise RatioError(f"{path} does not exist: pass the pre-training folder of a finished calibration run")
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[int(row["epoch"])] = row  # a replayed epoch: the last line wins
    return [rows[e] for e in sorted(rows)]


def read_target(target: str, epochs: int | None) -> dict[str, Any]:
    """The target of a match: a finished pre-training folder (its summary.json), or a prune ratio.

    Returns target_ratio, epochs (E: --epochs, else the run's), and for a run also target_run, num_samples and
    target_cost (compute in samples: trained + forward-only / 3)."""
    if os.path.isdir(target):
        summary = _read_json(os.path.join(target, SUMMARY_FILE))
        out = {"target_ratio": float(summary["prune_ratio"]), "target_run": os.path.abspath(target),
               "epochs": int(epochs or summary["epochs"])}
        if "samples_trained" in summary and "num_samples" in summary:
            out["num_samples"] = int(summary["num_samples"])
            out["target_cost"] = (float(summary["samples_trained"])
                                  + FORWARD_ONLY_COST * float(summary.get("samples_forward_only", 0)))
        return out
    try:
        ratio = float(target)
    except ValueError:
        raise RatioError(f"--target {target}: neither a folder nor a prune ratio. Fix: pass the pre-training folder "
                         "of a finished D3P run, or a ratio such as 0.5") from None
    _check_target(ratio)
    if epochs is None:
        raise RatioError(f"--target {target} is a ratio: pass --epochs (the length of the runs)")
    return {"target_ratio": ratio, "epochs": int(epochs)}


def solve(method: str, target_run: str, calibration: str | None, epochs: int | None, warmup: int,
          lr_warmup: int | None = None, d3p_schedule: Sequence[int] = (3, 10, 3, 0),
          by_compute: bool = False) -> dict[str, Any]:
    """The flags for `method` at the prune ratio of `target_run` (a finished pre-training folder, or a ratio).

    warmup: J of the static selectors; lr_warmup: the full run's --warmup_epochs (whole_eqc compresses it);
    d3p_schedule: (start, period, window, anneal epochs) of a d3p arm; by_compute (d3p, a ratio target): solve
    for the compute saved instead of the prune ratio (its forward-only passes counted)."""
    tgt = read_target(target_run, epochs)
    target = tgt["target_ratio"]
    out: dict[str, Any] = {"method": method, "target_ratio": target}
    if "target_run" in tgt:
        out["target_run"] = tgt["target_run"]
    if by_compute and (method != "d3p" or "target_run" in tgt):
        raise RatioError("--by_compute is for d3p at a ratio target: the other methods save what they prune")
    if method in ("infobatch", "seta"):
        if not calibration:
            raise RatioError(f"{method} needs --calibration: a finished {method} run of the same --epochs (e.g. the "
                             "default-ratio arm of the same seed)")
        cal = _read_json(os.path.join(calibration, SUMMARY_FILE))
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
        n_ep = tgt["epochs"]
        r = static_ratio(target, n_ep, warmup)
        out["flags"] = {"prune_ratio": r, "static_warmup_epochs": warmup}
        out["predicted_ratio"] = r * (n_ep - warmup) / n_ep
    elif method in ("random", "rs2"):
        out["flags"] = {"prune_ratio": target}
        out["predicted_ratio"] = target
    elif method == "orderdp":
        if target <= 0.0:
            raise RatioError("orderdp prunes in every epoch (q < 1): target 0.0% is out of reach")
        out["flags"] = {"orderdp_target_ratio": target}
        out["predicted_ratio"] = target
    elif method == "d3p":
        n_ep = tgt["epochs"]
        pruned = d3p_pruned_epochs(n_ep, *d3p_schedule)
        if by_compute:
            recording = d3p_recording_pruned_epochs(n_ep, *d3p_schedule)
            r = d3p_compute_ratio(target, n_ep, pruned, recording)
            out["target"] = "compute_saved"
            out["predicted_compute_saved"] = r * (pruned - FORWARD_ONLY_COST * recording) / n_ep
        else:
            r = d3p_ratio(target, n_ep, pruned)
        out["flags"] = {"d3p_target_ratio": r}
        out["predicted_ratio"] = r * pruned / n_ep
    elif method == "whole_eqc":
        if lr_warmup is None:
            raise RatioError("whole_eqc needs --warmup_epochs: the full run's warm-up, compressed with the epochs")
        n_ep = tgt["epochs"]
        # a ratio target t costs (1 - t) E epochs of whole data; a run target its own compute C
        if "target_run" in tgt and "target_cost" not in tgt:
            raise RatioError(f"{tgt['target_run']}/summary.json has no samples_trained / num_samples")
        n, cost = (tgt["num_samples"], tgt["target_cost"]) if "target_cost" in tgt else (1, (1.0 - target) * n_ep)
        new_epochs = equal_compute_epochs(cost, n, n_ep)
        out["flags"] = {"epochs": new_epochs, "warmup_epochs": compressed_warmup(lr_warmup, n_ep, new_epochs)}
        out["full_epochs"] = n_ep
        out["target_cost_epochs"] = cost / n
        out["predicted_ratio"] = 0.0  # no pruning: the saving is in the epochs
        out["predicted_compute_saved"] = 1.0 - new_epochs / n_ep
    else:
        raise RatioError(f"unknown method {method}; choose one of {', '.join(solvable_methods())}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Flags that make a fixed-ratio baseline realise a D3P run's prune ratio")
    p.add_argument("method", choices=solvable_methods())
    p.add_argument("--target", required=True, metavar="RUN_DIR|RATIO",
                   help="finished D3P pre-training folder, or a prune ratio in [0, 1) (then --epochs)")
    p.add_argument("--calibration", default=None, metavar="RUN_DIR",
                   help="infobatch/seta: a finished run of that method with the same --epochs/--delta")
    p.add_argument("--epochs", type=int, default=None,
                   help="dynunc/d2/whole_eqc: the full run's pre-training epochs (default: the target's)")
    p.add_argument("--static_warmup_epochs", type=int, default=10, help="dynunc/d2: J")
    p.add_argument("--warmup_epochs", type=int, default=None, help="whole_eqc: the full run's lr warm-up epochs")
    p.add_argument("--d3p_start", type=int, default=3, help="d3p: the run's --d3p_start")
    p.add_argument("--d3p_period", type=int, default=10, help="d3p: the run's --d3p_period")
    p.add_argument("--d3p_window", type=int, default=3, help="d3p: the run's --d3p_window")
    p.add_argument("--d3p_anneal_epochs", type=int, default=0, help="d3p: the run's --d3p_anneal_epochs")
    p.add_argument("--by_compute", action="store_true",
                   help="d3p at a ratio target: save that share of the compute (its forward-only passes over the "
                        "pruned samples counted) instead of pruning that share of the samples")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    try:
        result = solve(args.method, args.target, args.calibration, args.epochs, args.static_warmup_epochs,
                       args.warmup_epochs,
                       (args.d3p_start, args.d3p_period, args.d3p_window, args.d3p_anneal_epochs),
                       by_compute=args.by_compute)
    except RatioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(" ".join(f"--{k} {v!r}" for k, v in result["flags"].items()))  # exactly the values in --out
    if args.method == "whole_eqc":
        print(f"whole_eqc: target compute {result['target_cost_epochs']:.3f} epochs of whole data -> "
              f"{result['flags']['epochs']} of {result['full_epochs']} epochs", file=sys.stderr)
    elif args.by_compute:
        print(f"d3p: target compute saved {result['target_ratio']:.4f}, predicted "
              f"{result['predicted_compute_saved']:.4f} (prune ratio {result['predicted_ratio']:.4f})", file=sys.stderr)
    else:
        print(f"{args.method}: target {result['target_ratio']:.4f}, predicted {result['predicted_ratio']:.4f}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
