"""Selection time and peak memory of the static selectors (D2 Pruning, Dyn-Unc) and SeTa's 1-D k-means.

    python benchmarks/bench_static.py                       # N = 50,000 and 1,281,167
    python benchmarks/bench_static.py --sizes 1281167 --methods d2          # the whole D2 selection, faiss IVF
    python benchmarks/bench_static.py --sizes 1281167 --methods d2 --knn torch --knn-sample-rows 5120  # projection
    python benchmarks/bench_static.py --sizes 640000 --methods kmeans       # SeTa's exact 1-D k-means, G = 10

Each (method, N) runs in its own subprocess so that the peak-RSS figure (resource.getrusage ru_maxrss) belongs to
that measurement alone. Memory: the process's peak RSS and its growth over the inputs (covers numpy, torch and
faiss); Dyn-Unc also reports the tracemalloc peak (D2 does not: tracing slows its Python selection loop).

D2 runs on clustered synthetic embeddings, like encoder features rather than isotropic noise: a Gaussian mixture
with --centres components (sizes from a Dirichlet, so unequal) in a 32-d latent space, linearly embedded in --dim
dimensions plus small isotropic noise. Stages: the k-NN graph (`knn_graph`: backend/index as given; for an IVF
index its recall@10 against exact brute force on 1,000 seeded query rows), the undirected graph + forward pass,
and the reverse selection. With --knn torch and --knn-sample-rows R (< N) the exact k-NN is timed on R query rows
against all N and extrapolated linearly in rows, and the selection runs on a random k-regular graph of the right
size (the output says which numbers are measured and which are extrapolated).
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

from d3p.methods.common import kept_size  # noqa: E402  (needs the repository on sys.path when run as a script)
from d3p.methods.d2 import (  # noqa: E402
    _knn_query_rows, d2_forward, d2_select, default_gamma, knn_graph, neighbour_graph, prepare_embeddings,
)
from d3p.methods.dynunc import dynunc_select  # noqa: E402
from d3p.methods.seta import kmeans_1d  # noqa: E402


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


def clustered_embeddings(n: int, dim: int, centres: int, seed: int = 0) -> np.ndarray:
    """float32 [n, dim]: a `centres`-component Gaussian mixture in a 32-d latent space (Dirichlet sizes, component
    scales 0.5-1.5, centres spread 4x wider), mapped linearly to `dim` dimensions, plus isotropic noise 0.1."""
    rng = np.random.default_rng(seed)
    latent = 32
    mu = rng.normal(size=(centres, latent)) * 4.0
    scale = rng.uniform(0.5, 1.5, centres)
    comp = rng.choice(centres, size=n, p=rng.dirichlet(np.full(centres, 2.0)))
    proj = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
    emb = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 131072):
        c = comp[a : a + 131072]
        z = (mu[c] + rng.normal(size=(c.size, latent)) * scale[c, None]).astype(np.float32)
        emb[a : a + c.size] = z @ proj + rng.normal(size=(c.size, dim)).astype(np.float32) * 0.1
    return emb


def _bench_d2(n: int, dim: int, k: int, ratio: float, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    t_gen = time.perf_counter()
    emb = clustered_embeddings(n, dim, args.centres)
    difficulty = rng.uniform(0.2, 1.2, n)
    out: dict = {"method": "d2", "N": n, "dim": dim, "k": k, "device": args.device, "centres": args.centres,
                 "data_seconds": round(time.perf_counter() - t_gen, 1)}
    rss0 = _maxrss_mib()
    t0 = time.perf_counter()  # no tracemalloc here: it slows the Python-level selection loop several-fold
    sample_rows = args.knn_sample_rows
    if args.knn == "torch" and 0 < sample_rows < n:
        # Time the exact k-NN of `sample_rows` query rows against all N rows, then extrapolate.
        dist_s = _knn_rows(emb, k, sample_rows, args.device)
        knn_measured = time.perf_counter() - t0
        out["knn_seconds_extrapolated"] = round(knn_measured * n / sample_rows, 1)
        out["knn_seconds_measured_on_rows"] = [sample_rows, round(knn_measured, 2)]
        idx = rng.integers(0, n - 1, size=(n, k))
        idx += idx >= np.arange(n)[:, None]  # no self loops
        dist = rng.choice(dist_s.ravel(), size=(n, k)).astype(np.float32)
        out["graph"] = "random k-regular (selection timing only)"
    else:
        dist, idx, info = knn_graph(emb, k, backend=args.knn, index=args.knn_index, device=args.device,
                                    nprobe=args.nprobe, progress=True)
        out.update({key: (round(v, 4) if isinstance(v, float) else v) for key, v in info.items()})
        out["graph"] = "k-NN"
    t1 = time.perf_counter()
    gamma = default_gamma(dist)
    graph = neighbour_graph(dist, idx, gamma)
    scores = d2_forward(difficulty, graph)
    t2 = time.perf_counter()
    kept = d2_select(scores, graph, kept_size(n, ratio))
    t3 = time.perf_counter()
    out.update(graph_forward_seconds=round(t2 - t1, 2), select_seconds=round(t3 - t2, 2),
               total_seconds=round(t3 - t0, 1), kept=int(kept.size), graph_edges=int(graph.cols.size),
               rss_growth_mib=round(_maxrss_mib() - rss0, 1),
               peak_rss_mib=round(_maxrss_mib(), 1), inputs_mib=round(emb.nbytes / 2**20, 1))
    return out


def _bench_kmeans(n: int, groups: int) -> dict:
    """SeTa's exact 1-D k-means on n heavy-tailed (log-normal) loss values."""
    values = np.random.default_rng(0).lognormal(0.0, 1.0, n)
    rss0 = _maxrss_mib()
    t0 = time.perf_counter()
    labels, centres = kmeans_1d(values, groups)
    seconds = time.perf_counter() - t0
    return {"method": "kmeans", "N": n, "groups": int(centres.size), "seconds": round(seconds, 2),
            "rss_growth_mib": round(_maxrss_mib() - rss0, 1)}


def _knn_rows(emb: np.ndarray, k: int, rows: int, device: str) -> np.ndarray:
    """float32 [rows, k] exact k-NN distances of the first `rows` rows against all N rows (knn_chunked's kernel)."""
    import torch

    x, sq = prepare_embeddings(emb, device)
    out = []
    with torch.no_grad():
        for a in range(0, rows, 1024):
            val, _ = _knn_query_rows(x, sq, torch.arange(a, min(a + 1024, rows), device=x.device), k, 32768)
            out.append(val.clamp_min_(0).sqrt_().cpu())
    return torch.cat(out).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 1_281_167])
    p.add_argument("--methods", nargs="+", choices=("d2", "dynunc", "kmeans"), default=["d2", "dynunc"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--neighbors", type=int, default=10)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=10, help="Dyn-Unc: recorded epochs J")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--groups", type=int, default=10, help="kmeans: groups G")
    p.add_argument("--centres", type=int, default=4000, help="d2: mixture components of the synthetic embeddings")
    p.add_argument("--device", default="cpu")
    p.add_argument("--knn", default="auto", choices=("auto", "faiss", "torch"))
    p.add_argument("--knn-index", dest="knn_index", default="auto", choices=("auto", "flat", "ivf"))
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--knn-sample-rows", type=int, default=0,
                   help="--knn torch: time the exact k-NN on this many rows and extrapolate (0: full k-NN)")
    p.add_argument("--single", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        method, n = args.single[0], int(args.single[1])
        if method == "dynunc":
            res = _bench_dynunc(n, args.epochs, args.window, args.ratio)
        elif method == "kmeans":
            res = _bench_kmeans(n, args.groups)
        else:
            res = _bench_d2(n, args.dim, args.neighbors, args.ratio, args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    import torch

    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}", flush=True)
    passthrough = _drop_list_flags(sys.argv[1:], ("--sizes", "--methods"))
    for n in args.sizes:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--single", method, str(n), *passthrough]
            print(f"# running {method} N={n} ...", flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            print(lines[-1][len("RESULT "):] if lines else f"# {method} N={n} failed (exit {proc.returncode})",
                  flush=True)


def _drop_list_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given nargs='+' flags and their values (the parent loops over them itself)."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=")[0] in flags
            if skipping:
                continue
        elif skipping:
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
