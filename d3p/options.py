"""The pruning options: one definition shared by the command-line flags, their validation and `DataPruner`.

    parser = argparse.ArgumentParser(); d3p.add_pruning_args(parser)        # --prune_method, --d3p_start, ...
    args = parser.parse_args(); problems = d3p.validate_pruning_args(args)  # [] when valid
    pruner = d3p.DataPruner.from_args(args, num_samples)
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from d3p.schedule import validate_schedule

PRUNE_METHODS = ("d3p", "none", "infobatch", "seta", "random", "rs2", "dynunc", "d2")

# option name (= flag dest) -> default; DataPruner(**options) takes the same names
DEFAULTS: dict[str, Any] = {
    "d3p_start": 3,
    "d3p_period": 10,
    "d3p_window": 3,
    "d3p_bins": 128,
    "d3p_quantile": 0.999,
    "d3p_anneal_epochs": 0,
    "prune_ratio": 0.5,
    "delta": 0.875,
    "seta_groups": 10,
    "seta_window_scale": 0.5,
    "random_match": None,
    "static_warmup_epochs": 10,
    "dynunc_window": 3,
    "d2_neighbors": 10,
    "d2_gamma": None,
    "d2_mode": "sum",
    "d2_sampling": "absolute",
    "d2_knn": "auto",
    "d2_knn_index": "auto",
    "d2_nprobe": 8,
}

# the options that define each method (summary.json's "flags"; tools/make_table.py groups runs by them)
METHOD_OPTIONS: dict[str, list[str]] = {
    "d3p": ["d3p_start", "d3p_period", "d3p_window", "d3p_bins", "d3p_quantile", "d3p_anneal_epochs"],
    "infobatch": ["prune_ratio", "delta"],
    "seta": ["prune_ratio", "delta", "seta_groups", "seta_window_scale"],
    "random": ["prune_ratio", "random_match"],
    "rs2": ["prune_ratio"],
    "dynunc": ["prune_ratio", "static_warmup_epochs", "dynunc_window"],
    "d2": ["prune_ratio", "static_warmup_epochs", "d2_neighbors", "d2_gamma", "d2_mode", "d2_sampling",
           "d2_knn", "d2_knn_index", "d2_nprobe"],
    "none": [],
}


def add_pruning_args(
    parser: argparse.ArgumentParser, methods: Sequence[str] = PRUNE_METHODS, default: str = "d3p"
) -> argparse._ArgumentGroup:
    """Add the "pruning" flag group. `methods` lists the methods this entry point supports (the help names
    them, the static selectors' flags are added only with them; `validate_pruning_args(args, methods)`
    refuses the others with a message)."""
    d = DEFAULTS
    g = parser.add_argument_group("pruning")
    g.add_argument("--prune_method", default=default, choices=PRUNE_METHODS,
                   help=f"one of {', '.join(methods)} (default: {default})")
    g.add_argument("--d3p_start", "--s", dest="d3p_start", default=d["d3p_start"], type=int,
                   help="s: first prune epoch (1-based)")
    g.add_argument("--d3p_period", "--p", dest="d3p_period", default=d["d3p_period"], type=int,
                   help="p: epochs between decisions")
    g.add_argument("--d3p_window", "--n", dest="d3p_window", default=d["d3p_window"], type=int,
                   help="n: recorded epochs per decision")
    g.add_argument("--d3p_bins", "--bin_num", dest="d3p_bins", default=d["d3p_bins"], type=int, help="histogram bins")
    g.add_argument("--d3p_quantile", default=d["d3p_quantile"], type=float, help="grid end of the ideal density")
    g.add_argument("--d3p_anneal_epochs", default=d["d3p_anneal_epochs"], type=int, help="full data in the last K epochs")
    g.add_argument("--prune_ratio", default=d["prune_ratio"], type=float, help="r of InfoBatch/SeTa/random/RS2/static methods")
    g.add_argument("--delta", default=d["delta"], type=float,
                   help="InfoBatch/SeTa: full data from 0-based epoch floor(delta*epochs)")
    g.add_argument("--seta_groups", default=d["seta_groups"], type=int)
    g.add_argument("--seta_window_scale", default=d["seta_window_scale"], type=float)
    g.add_argument("--random_match", default=d["random_match"],
                   help="RUN_DIR of a D3P run: keep as many samples per epoch as it did")
    if any(m in methods for m in ("dynunc", "d2")):
        g.add_argument("--static_warmup_epochs", default=d["static_warmup_epochs"], type=int,
                       help="J: full-data epochs before a static selection")
        g.add_argument("--dynunc_window", default=d["dynunc_window"], type=int)
        g.add_argument("--d2_neighbors", default=d["d2_neighbors"], type=int)
        g.add_argument("--d2_gamma", default=d["d2_gamma"], type=float, help="default: 1 / median k-NN distance")
        g.add_argument("--d2_mode", default=d["d2_mode"], choices=["sum", "product"])
        g.add_argument("--d2_sampling", default=d["d2_sampling"], choices=["weighted", "absolute"])
        g.add_argument("--d2_knn", default=d["d2_knn"], choices=["auto", "faiss", "torch"],
                       help="k-NN backend: faiss when installed (faiss-gpu on CUDA), else exact chunked torch")
        g.add_argument("--d2_knn_index", default=d["d2_knn_index"], choices=["auto", "flat", "ivf"],
                       help="faiss index: flat (exact) or ivf (approximate); auto: flat on GPU or N <= 100k, else ivf")
        g.add_argument("--d2_nprobe", default=d["d2_nprobe"], type=int, help="ivf: cells searched per query")
    return g


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The pruning options held by parsed flags (those this entry point defines)."""
    return {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}


def validate_options(method: str, epochs: int | None, options: dict[str, Any],
                     methods: Sequence[str] = PRUNE_METHODS) -> list[str]:
    """Messages naming each forbidden value or combination and its fix; empty when valid."""
    o = {**DEFAULTS, **options}
    problems = []
    if method not in methods:
        why = ""
        if method in ("dynunc", "d2"):
            why = (" (a static coreset selected during pre-training; to train on it, export it with "
                   "`d3p-export RUN_DIR --out kept.npy` and train on that subset)")
        problems.append(f"--prune_method {method} is not supported here{why}. Fix: use one of {', '.join(methods)}")
    if method == "d3p":
        problems += validate_schedule(o["d3p_start"], o["d3p_period"], o["d3p_window"], o["d3p_anneal_epochs"])
    if o["d3p_bins"] < 2:
        problems.append(f"--d3p_bins must be >= 2, got {o['d3p_bins']}")
    if not 0.0 < o["d3p_quantile"] < 1.0:
        problems.append(f"--d3p_quantile must lie in (0, 1), got {o['d3p_quantile']}")
    if not 0.0 <= o["prune_ratio"] < 1.0:
        problems.append(f"--prune_ratio must lie in [0, 1), got {o['prune_ratio']}")
    if not 0.0 < o["delta"] <= 1.0:
        problems.append(f"--delta must lie in (0, 1], got {o['delta']}")
    if o["random_match"] and method != "random":
        problems.append("--random_match needs --prune_method random")
    if o["d2_nprobe"] < 1:
        problems.append(f"--d2_nprobe must be >= 1, got {o['d2_nprobe']}")
    if o["d2_knn"] == "torch" and o["d2_knn_index"] == "ivf":
        problems.append("--d2_knn_index ivf needs --d2_knn faiss or auto (the torch k-NN is exact only)")
    if method in ("dynunc", "d2") and epochs is not None and not 1 <= o["static_warmup_epochs"] < epochs:
        problems.append(f"--static_warmup_epochs must lie in [1, --epochs), got {o['static_warmup_epochs']}")
    if method in ("d3p", "infobatch", "seta") and epochs is None:
        problems.append(f"method {method} needs the number of epochs (its schedule). Fix: pass epochs=E")
    return problems


def validate_pruning_args(args: argparse.Namespace, methods: Sequence[str] = PRUNE_METHODS) -> list[str]:
    """`validate_options` for parsed flags (`add_pruning_args`): the entry point reports the messages."""
    return validate_options(args.prune_method, getattr(args, "epochs", None), options_of(args), methods)
