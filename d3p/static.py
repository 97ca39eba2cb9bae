"""Static data-pruning seeds of spec section 10, adapted to MAE (no labels: the reconstruction loss is the signal).

- Dyn-Unc (He et al., "Large-scale Dataset Pruning with Dynamic Uncertainty"): per-sample loss recorded for J
  full-data epochs; score = mean over sliding windows (width w, over epochs) of the loss's std inside the window;
  keep the top (1-r) fraction.
- D2 Pruning (Maharana et al., 2023): k-NN graph of warm-up encoder embeddings (faiss: exact, or IVF at scale;
  or the exact chunked torch path), made undirected, forward message passing of the difficulty (loss), then
  reverse message passing while selecting.

Both select once, at the end of warm-up epoch J-1, and then train on the fixed subset (`DynUnc` in
d3p/methods/dynunc.py, `D2Pruning` in d3p/methods/d2.py). This module is their offline command-line tool
(`d3p-static` when installed):

    python -m d3p.static dynunc --losses L.npy --ratio 0.3 --out kept.npy [--window 3]
    python -m d3p.static d2 --losses L.npy --embeddings E.npy --ratio 0.3 --out kept.npy [--neighbors 10]
        [--knn auto|faiss|torch] [--knn_index auto|flat|ivf] [--nprobe 16] ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from d3p.methods.d2 import FAISS_EXACT_MAX_N, KNN_BACKENDS, KNN_INDEXES, _PURPOSE_D2_WEIGHTED, _import_faiss, d2_prune
from d3p.methods.dynunc import dynunc_select
from d3p.strategy import epoch_rng


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m d3p.static", description="Offline static subset selection (Dyn-Unc, D2 Pruning)."
    )
    sub = parser.add_subparsers(dest="method", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--losses", required=True, type=Path, help="L.npy: per-sample losses, (J, N) or (N,) for d2")
    common.add_argument("--ratio", required=True, type=float, help="prune ratio r in [0, 1); keeps round((1-r)N)")
    common.add_argument("--out", required=True, type=Path, help="where to write the kept indices (int64 .npy)")
    common.add_argument("--seed", type=int, default=0)
    p_dyn = sub.add_parser("dynunc", parents=[common], help="Dyn-Unc: top dynamic uncertainty")
    p_dyn.add_argument("--window", type=int, default=3, help="sliding window width over epochs (2..J)")
    p_d2 = sub.add_parser("d2", parents=[common], help="D2 Pruning: graph message passing on embeddings")
    p_d2.add_argument("--embeddings", type=Path, help="E.npy: (N, D) embeddings (required)")
    p_d2.add_argument("--neighbors", type=int, default=10)
    p_d2.add_argument("--gamma", type=float, default=None, help="edge weight exp(-gamma*d); default 1/median k-NN d")
    p_d2.add_argument("--mode", choices=("sum", "product"), default="sum")
    p_d2.add_argument("--sampling", choices=("absolute", "weighted"), default="absolute")
    p_d2.add_argument("--chunk", type=int, default=None, help="torch k-NN: query rows per chunk (default 1024)")
    p_d2.add_argument("--device", default="cpu", help="device for the k-NN (cpu, cuda)")
    p_d2.add_argument("--knn", choices=KNN_BACKENDS, default="auto",
                      help="k-NN backend: faiss (if installed) or the exact chunked torch path")
    p_d2.add_argument("--knn_index", choices=KNN_INDEXES, default="auto",
                      help=f"faiss index: flat (exact) or ivf (approximate); auto: flat on GPU or N <= "
                           f"{FAISS_EXACT_MAX_N}, else ivf")
    p_d2.add_argument("--nprobe", type=int, default=8, help="ivf: cells searched per query")
    return parser


def _load_npy(parser: argparse.ArgumentParser, path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        parser.error(f"{what} file {path} does not exist: pass the path of a .npy file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is a usage error here
        parser.error(f"cannot read {what} file {path} as .npy ({exc}): save it with numpy.save")
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number):
        parser.error(f"{what} file {path} must hold a numeric array, got dtype {getattr(arr, 'dtype', '?')}")
    if not np.all(np.isfinite(arr)):
        parser.error(f"{what} file {path} has NaN/inf entries: impute or drop them first")
    return arr


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.ratio < 1.0:
        parser.error(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.out.suffix != ".npy":
        parser.error(f"--out must end in .npy (numpy.save would append it), got {args.out}")
    losses = _load_npy(parser, args.losses, "--losses")
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if args.method == "dynunc":
        if losses.ndim != 2:
            parser.error(f"dynunc needs --losses of shape (J epochs, N samples), got shape {losses.shape}")
        if not 2 <= args.window <= losses.shape[0]:
            parser.error(f"--window must be in [2, J={losses.shape[0]}] for losses of shape {losses.shape}")
        n = losses.shape[1]
        kept = dynunc_select(losses, args.window, args.ratio)
        extra["window"] = args.window
    else:
        if args.embeddings is None:
            parser.error("d2 needs --embeddings E.npy of shape (N, D)")
        if losses.ndim == 2:
            difficulty = losses.astype(np.float64).mean(axis=0)
        elif losses.ndim == 1:
            difficulty = losses.astype(np.float64)
        else:
            parser.error(f"d2 needs --losses of shape (J, N) or (N,), got shape {losses.shape}")
        emb = _load_npy(parser, args.embeddings, "--embeddings")
        n = difficulty.shape[0]
        if emb.ndim != 2 or emb.shape[0] != n:
            parser.error(f"--embeddings must have shape (N={n}, D) to match --losses, got shape {emb.shape}")
        if not 1 <= args.neighbors < n:
            parser.error(f"--neighbors must be in [1, N-1={n - 1}], got {args.neighbors}")
        if args.gamma is not None and not args.gamma > 0:
            parser.error(f"--gamma must be > 0 (or omitted for 1/median k-NN distance), got {args.gamma}")
        if args.chunk is not None and args.chunk < 1:
            parser.error(f"--chunk must be >= 1, got {args.chunk}")
        if args.nprobe < 1:
            parser.error(f"--nprobe must be >= 1, got {args.nprobe}")
        if args.knn == "torch" and args.knn_index == "ivf":
            parser.error("--knn_index ivf needs --knn faiss or auto (the torch k-NN is exact only)")
        if args.knn == "faiss" and _import_faiss(required=False) is None:
            parser.error("--knn faiss needs the faiss package: pip install faiss-cpu, or pass --knn torch")
        kept, stats = d2_prune(
            difficulty, emb.astype(np.float32), args.ratio, neighbors=args.neighbors, gamma=args.gamma,
            mode=args.mode, sampling=args.sampling, rng=epoch_rng(args.seed, 0, _PURPOSE_D2_WEIGHTED),
            chunk=args.chunk, device=args.device, knn_backend=args.knn, knn_index=args.knn_index,
            nprobe=args.nprobe, seed=args.seed,
        )
        extra.update(gamma=stats["gamma"], neighbors=args.neighbors, mode=args.mode, sampling=args.sampling,
                     **{key: value for key, value in stats.items() if key.startswith("knn_")})
    seconds = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, kept.astype(np.int64))
    print(json.dumps({"method": args.method, "N": int(n), "kept": int(kept.size),
                      "prune_ratio": 1.0 - kept.size / n, "seconds": round(seconds, 3), **extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
