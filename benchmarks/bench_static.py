"""Selection time and peak memory of the static selectors (D2 Pruning, Dyn-Unc) on synthetic data.

    python benchmarks/bench_static.py                       # N = 50,000 and 1,281,167
    python benchmarks/bench_static.py --sizes 50000 --methods d2
    python benchmarks/bench_static.py --sizes 1281167 --knn-sample-rows 20000   # extrapolate the k-NN stage

Each (method, N) runs in its own subprocess so that the peak-RSS figure (resource.getrusage ru_maxrss) belongs to
that measurement alone. Memory is reported two ways: the tracemalloc peak (numpy buffers and Python objects; torch
CPU tensors are not traced) and the growth of the process's peak RSS over the inputs (covers torch too).

D2 on 256-d random embeddings: the exact k-NN is O(N^2 D) flops (~4e14 for ImageNet-1K: hours on a 2-core CPU,
seconds to minutes on a GPU with --device cuda). With --knn-sample-rows R (< N) the k-NN is timed on R query rows
against all N and extrapolated linearly in rows (the cost per row is constant), and the reverse-selection stage
then runs on a random k-regular directed graph of the right size (same N, k, edge count; the selection cost
depends on N, k and the degrees, not on the geometry). The output says which numbers are measured and which are
extrapolated.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d3p.static import (  # noqa: E402  (needs the repository on sys.path when run as a script)
    _knn_query_rows,
    d2_forward,
    d2_select,
    default_gamma,
    dynunc_select,
    knn_chunked,
    prepare_embeddings,
)
from d3p.baselines import kept_size  # noqa: E402


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _bench_dynunc(n: int, epochs: int, window: int, ratio: float) -> dict:
    history = np.random.default_rng(0).uniform(0.2, 1.2, size=(epochs, n)).astype(np.float32)
    rss0 = _maxrss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    kept = dynunc_select(history, window, ratio)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"method": "dynunc", "N": n, "J": epochs, "window": window, "kept": int(kept.size),
            "seconds": round(seconds, 3), "tracemalloc_peak_mib": round(peak / 2**20, 1),
            "rss_growth_mib": round(_maxrss_mib() - rss0, 1), "inputs_mib": round(history.nbytes / 2**20, 1)}


def _bench_d2(n: int, dim: int, k: int, ratio: float, chunk: int | None, device: str, sample_rows: int) -> dict:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    difficulty = rng.uniform(0.2, 1.2, n)
    rss0 = _maxrss_mib()
    tracemalloc.start()
    out: dict = {"method": "d2", "N": n, "dim": dim, "k": k, "device": device}
    t0 = time.perf_counter()
    if 0 < sample_rows < n:
        # Time the k-NN of `sample_rows` query rows against all N rows, then extrapolate.
        dist_s = _knn_rows(emb, k, sample_rows, chunk, device)
        knn_measured = time.perf_counter() - t0
        out["knn_seconds_extrapolated"] = round(knn_measured * n / sample_rows, 1)
        out["knn_seconds_measured_on_rows"] = [sample_rows, round(knn_measured, 2)]
        # A random k-regular directed graph of the right size for the selection stage, with distances drawn from
        # the measured sample's distance distribution.
        idx = rng.integers(0, n - 1, size=(n, k))
        idx += idx >= np.arange(n)[:, None]  # no self loops
        dist = rng.choice(dist_s.ravel(), size=(n, k)).astype(np.float32)
        out["graph"] = "random k-regular (selection timing only)"
    else:
        dist, idx = knn_chunked(emb, k, chunk=chunk, device=device, progress=True)
        out["knn_seconds"] = round(time.perf_counter() - t0, 2)
        out["graph"] = "exact k-NN"
    t1 = time.perf_counter()
    gamma = default_gamma(dist)
    scores = d2_forward(difficulty, dist, idx, gamma)
    t2 = time.perf_counter()
    kept = d2_select(scores, dist, idx, gamma, kept_size(n, ratio))
    t3 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out.update(forward_seconds=round(t2 - t1, 2), select_seconds=round(t3 - t2, 2), kept=int(kept.size),
               tracemalloc_peak_mib=round(peak / 2**20, 1), rss_growth_mib=round(_maxrss_mib() - rss0, 1),
               inputs_mib=round(emb.nbytes / 2**20, 1))
    return out


def _knn_rows(emb: np.ndarray, k: int, rows: int, chunk: int | None, device: str) -> np.ndarray:
    """float32 [rows, k] k-NN distances of the first `rows` rows against all N rows (knn_chunked's kernel)."""
    import torch

    x, sq = prepare_embeddings(emb, device)
    chunk = chunk or 1024
    out = []
    with torch.no_grad():
        for a in range(0, rows, chunk):
            val, _ = _knn_query_rows(x, sq, a, min(a + chunk, rows), k, 32768)
            out.append(val.clamp_min_(0).sqrt_().cpu())
    return torch.cat(out).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 1_281_167])
    p.add_argument("--methods", nargs="+", choices=("d2", "dynunc"), default=["d2", "dynunc"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--neighbors", type=int, default=10)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=10, help="Dyn-Unc: recorded epochs J")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--knn-sample-rows", type=int, default=0,
                   help="time the k-NN on this many rows and extrapolate (0: full exact k-NN)")
    p.add_argument("--single", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        method, n = args.single[0], int(args.single[1])
        if method == "dynunc":
            res = _bench_dynunc(n, args.epochs, args.window, args.ratio)
        else:
            res = _bench_d2(n, args.dim, args.neighbors, args.ratio, args.chunk, args.device, args.knn_sample_rows)
        print("RESULT " + json.dumps(res), flush=True)
        return
    import torch

    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}", flush=True)
    for n in args.sizes:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--single", method, str(n), "--dim", str(args.dim),
                   "--neighbors", str(args.neighbors), "--ratio", str(args.ratio), "--epochs", str(args.epochs),
                   "--window", str(args.window), "--device", args.device,
                   "--knn-sample-rows", str(args.knn_sample_rows)]
            if args.chunk:
                cmd += ["--chunk", str(args.chunk)]
            print(f"# running {method} N={n} ...", flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            print(lines[-1][len("RESULT "):] if lines else f"# {method} N={n} failed (exit {proc.returncode})",
                  flush=True)


if __name__ == "__main__":
    main()
