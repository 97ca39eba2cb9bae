"""Offline D3P decision from a saved loss window.

    python -m d3p.decide LOSSES.npy --out DECISION.npz [--bins 128] [--quantile 0.999]
                         [--seed 0] [--min-kept 1] [--plot FIG.png]
                         [--max-weight W] [--min-kept-share F] [--poor-fit warn|keep_tail|keep_all]
                         [--fit-threshold T] [--classification]

The rails (`--max-weight`, `--min-kept-share`, `--poor-fit`, `--fit-threshold`) are those of DataPruner and the
scripts' --d3p_max_weight, --d3p_min_kept, --d3p_poor_fit, --d3p_fit_threshold; off by default (the published
decision). `--classification` takes the classification defaults (DataPruner's default) for those not given.

LOSSES.npy: float array (n, N), losses[t, i] = loss of sample i in recording epoch t.
DECISION.npz: pruned (bool N), weights (float32 N), cld (float64 N), support (float64 2),
observed and expected (int64 bins). Prints one JSON line with the decision's counts.
Bad input exits with status 2 and a message naming the problem; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .fit import FIT_KS_THRESHOLD, POOR_FIT_ACTIONS


# What matplotlib's Agg canvas writes (FigureCanvasAgg.get_supported_filetypes()); listed here
# so a bad --plot suffix is refused before matplotlib is imported and any work is done.
_IMAGE_FORMATS = {"png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp",
                  "raw", "rgba"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m d3p.decide",
        description="Make one D3P pruning decision from a (n_epochs, N) loss window.",
    )
    p.add_argument("losses", help=".npy file with a float array of shape (n_epochs, N)")
    p.add_argument("--out", required=True, help="output .npz file for the decision")
    p.add_argument("--bins", type=int, default=128, help="histogram bins inside the support (>= 2)")
    p.add_argument("--quantile", type=float, default=0.999,
                   help="grid quantile of the ideal CLD distribution, in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trimming generator")
    p.add_argument("--min-kept", type=int, default=1, help="keep at least this many samples")
    p.add_argument("--plot", default=None, help="also write the decision figure (e.g. FIG.png)")
    p.add_argument("--max-weight", type=float, default=None,
                   help="cap on the up-weights (0: no cap, the published method; 1: none; classification: 1)")
    p.add_argument("--min-kept-share", type=float, default=None,
                   help="keep at least this share of the samples, in [0, 1] (classification: 0.5)")
    p.add_argument("--poor-fit", choices=POOR_FIT_ACTIONS, default=None,
                   help="what a decision whose fit KS exceeds --fit-threshold does (default warn)")
    p.add_argument("--fit-threshold", type=float, default=None,
                   help=f"the KS distance above which the fit is poor, in (0, 1] (default {FIT_KS_THRESHOLD:g})")
    p.add_argument("--classification", action="store_true",
                   help="a classifier's cross-entropy: the rails not given take their classification defaults")
    return p


def _rails(args: argparse.Namespace) -> dict:
    """The rails' values: those given, else the defaults of the loss kind (the published ones, or
    --classification's), read from the registered D3P options so that they cannot drift from DataPruner's."""
    from .options import defaults

    kind = defaults(("d3p",), "classification" if args.classification else "reconstruction")
    given = {"d3p_max_weight": args.max_weight, "d3p_min_kept": args.min_kept_share,
             "d3p_poor_fit": args.poor_fit, "d3p_fit_threshold": args.fit_threshold}
    return {name: kind[name] if value is None else value for name, value in given.items()}


def _load(parser: argparse.ArgumentParser, path: str) -> np.ndarray:
    if not os.path.isfile(path):
        parser.error(f"LOSSES file not found: {path!r}; pass the .npy written by np.save(path, losses)")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
        parser.error(f"cannot read {path!r} as a .npy array ({err}); save it with np.save(path, losses)")
    if not isinstance(arr, np.ndarray):
        parser.error(f"{path!r} is an .npz archive, not a single .npy array; save one (n_epochs, N) array with np.save")
    if arr.ndim != 2:
        parser.error(
            f"LOSSES must be 2-D (n_epochs, N), got ndim={arr.ndim} shape={arr.shape}; "
            "stack the per-epoch loss vectors with np.stack([l_1, ..., l_n])"
        )
    if arr.dtype.kind not in "fiu":
        parser.error(f"LOSSES must hold real numbers (float), got dtype {arr.dtype}")
    if arr.shape[0] < 1 or arr.shape[1] < 2:
        parser.error(f"LOSSES needs at least 1 epoch and 2 samples, got shape {arr.shape}")
    arr = np.asarray(arr, dtype=np.float64 if arr.dtype.kind in "iu" else arr.dtype)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        t, i = (int(v) for v in bad[0])
        parser.error(
            f"LOSSES has {bad.shape[0]} NaN/inf values (first at epoch {t}, sample {i}); every "
            "sample needs a finite loss in every recording epoch: re-record or drop those samples"
        )
    return arr


def _replace_atomic(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.bins < 2:
        parser.error(f"--bins must be >= 2, got {args.bins}")
    if not 0.0 < args.quantile < 1.0:
        parser.error(f"--quantile must be strictly between 0 and 1 (e.g. 0.999), got {args.quantile}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.min_kept < 0:
        parser.error(f"--min-kept must be >= 0, got {args.min_kept}")
    rails = _rails(args)
    if not (rails["d3p_max_weight"] == 0 or rails["d3p_max_weight"] >= 1):
        parser.error(f"--max-weight must be 0 (no cap) or >= 1, got {rails['d3p_max_weight']}")
    if not 0.0 <= rails["d3p_min_kept"] <= 1.0:
        parser.error(f"--min-kept-share must lie in [0, 1], got {rails['d3p_min_kept']}")
    if not 0.0 < rails["d3p_fit_threshold"] <= 1.0:
        parser.error(f"--fit-threshold must lie in (0, 1], got {rails['d3p_fit_threshold']}")
    out = Path(args.out)
    plot = Path(args.plot) if args.plot else None
    for target, flag in ((out, "--out"), (plot, "--plot")):
        if target is not None and not target.parent.resolve().is_dir():
            parser.error(f"{flag}: directory {str(target.parent)!r} does not exist; create it first")
    fmt = None
    if plot is not None:
        fmt = plot.suffix.lstrip(".").lower() or "png"
        if fmt not in _IMAGE_FORMATS:
            parser.error(f"--plot: unsupported image format {fmt!r}; use e.g. FIG.png")

    losses = _load(parser, args.losses)
    # Imported after the cheap checks so that argument errors answer fast.
    from .stats import DegenerateWindowError, decide

    try:
        share = rails["d3p_min_kept"]
        floor = max(args.min_kept, math.ceil(share * losses.shape[1] - 1e-9) if share else 0)  # as D3P's
        decision = decide(losses, bins=args.bins, quantile=args.quantile, rng=args.seed, min_kept=floor,
                          max_weight=rails["d3p_max_weight"], poor_fit=rails["d3p_poor_fit"],
                          fit_threshold=rails["d3p_fit_threshold"])
    except DegenerateWindowError as err:  # non-finite was checked above; keep the contract anyway
        parser.error(str(err))

    # Write to temporaries and rename at the end: a failure leaves no half-written output.
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_plot = plot.with_name(plot.name + ".tmp") if plot is not None else None
    try:
        with open(tmp_out, "wb") as fh:
            np.savez(
                fh,
                pruned=decision.pruned.astype(bool),
                weights=decision.weights.astype(np.float32),
                cld=decision.cld.astype(np.float64),
                support=decision.support.astype(np.float64),
                observed=decision.observed.astype(np.int64),
                expected=decision.expected.astype(np.int64),
            )
        if plot is not None:
            from .plot import plot_decision

            plot_decision(decision, decision.density, tmp_plot, fmt=fmt)
            _replace_atomic(tmp_plot, plot)
        _replace_atomic(tmp_out, out)
    finally:
        for tmp in (tmp_out, tmp_plot):
            if tmp is not None and tmp.exists():
                tmp.unlink()

    summary = decision.summary()
    line = {k: summary[k] for k in ("N", "pruned", "easy", "hard", "trimmed", "upweighted",
                                    "prune_ratio", "seconds")}
    line.update(restored=summary["restored"], reason=summary["reason"], fit_ks=summary["fit_ks"],
                poor_fit=summary["poor_fit"], max_weight=summary["max_weight"], capped=summary["capped"],
                tail_kept=summary["tail_kept"])
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
