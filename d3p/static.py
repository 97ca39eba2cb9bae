"""Static data-pruning seeds of spec section 10, adapted to MAE (no labels: the reconstruction loss is the signal).

- Dyn-Unc (He et al., "Large-scale Dataset Pruning with Dynamic Uncertainty"): per-sample loss recorded for J
  full-data epochs; score = mean over sliding windows (width w, over epochs) of the loss's std inside the window;
  keep the top (1-r) fraction.
- D2 Pruning (Maharana et al., 2023): k-NN graph of warm-up encoder embeddings (faiss: exact, or IVF at scale;
  or the exact chunked torch path), made undirected, forward message passing of the difficulty (loss), then
  reverse message passing while selecting.

Both select once, at the end of warm-up epoch J-1, and then train on the fixed subset (`DynUnc`, `D2Pruning`).
The pure functions are usable offline through the CLI:

    python -m d3p.static dynunc --losses L.npy --ratio 0.3 --out kept.npy [--window 3]
    python -m d3p.static d2 --losses L.npy --embeddings E.npy --ratio 0.3 --out kept.npy [--neighbors 10]
        [--knn auto|faiss|torch] [--knn_index auto|flat|ivf] [--nprobe 16] ...
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from d3p.baselines import _Base, kept_size
from d3p.strategy import EpochLosses, EpochPlan, epoch_rng

_PURPOSE_D2_WEIGHTED = 41
# k-NN tiling: a [rows x cols] float32 distance tile of 1024 x 32768 (128 MiB) was as fast as any shape we tried
# on a 2-core CPU (measured back to back at N = 1.28M: ~44 GFLOPS vs ~17 for a single [52 x N] slab of the same
# memory, which re-reads all of x for a handful of rows); on a GPU larger row chunks pay off (pass chunk=).
_KNN_ROW_CHUNK = 1024
_KNN_COL_CHUNK = 32768


# ----------------------------------------------------------------------------------------------------------------
# Dyn-Unc
# ----------------------------------------------------------------------------------------------------------------
def dynunc_scores(loss_history: np.ndarray, window: int, column_chunk: int = 65536) -> np.ndarray:
    """Dynamic uncertainty of every sample.

    loss_history: float [J, N] per-sample loss of J consecutive epochs (finite). Returns float64 [N]:
    mean over the J-w+1 windows [k, k+w) of the population std (ddof=0) of the sample's loss in the window.
    (ddof only scales every score by the same constant, so the ranking does not depend on it.)
    Columns are processed in chunks so the temporary [J-w+1, chunk, w] float64 block stays small for large N.
    """
    h = np.asarray(loss_history)
    if h.ndim != 2:
        raise ValueError(f"loss_history must be 2-D (epochs J, samples N), got shape {h.shape}")
    num_epochs, n = h.shape
    if not 2 <= window <= num_epochs:
        raise ValueError(f"window must be in [2, J={num_epochs}] (a std needs >= 2 epochs), got {window}")
    if not np.all(np.isfinite(h)):
        raise ValueError("loss_history has non-finite entries (NaN: a sample without a loss in some epoch)")
    scores = np.empty(n, dtype=np.float64)
    for a in range(0, n, column_chunk):
        block = h[:, a : a + column_chunk].astype(np.float64)
        windows = sliding_window_view(block, window, axis=0)  # [J-w+1, chunk, w], a view
        scores[a : a + column_chunk] = windows.std(axis=-1).mean(axis=0)
    return scores


def top_k_indices(scores: np.ndarray, count: int) -> np.ndarray:
    """int64 [count] sorted indices of the `count` highest scores; ties go to the lower index (deterministic)."""
    s = np.asarray(scores, dtype=np.float64)
    if not 0 <= count <= s.size:
        raise ValueError(f"cannot keep {count} of {s.size} samples")
    order = np.lexsort((np.arange(s.size), -s))  # primary key: score descending; secondary: index ascending
    return np.sort(order[:count]).astype(np.int64)


def dynunc_select(loss_history: np.ndarray, window: int, ratio: float) -> np.ndarray:
    """int64 sorted indices of the round((1-ratio)*N) samples with the highest dynamic uncertainty."""
    scores = dynunc_scores(loss_history, window)
    return top_k_indices(scores, kept_size(scores.size, ratio))


# ----------------------------------------------------------------------------------------------------------------
# D2 Pruning: k-NN graph
# ----------------------------------------------------------------------------------------------------------------
def _knn_query_rows(
    x: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor, k: int, col_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k-NN of the query rows `rows` of x among all rows of x except themselves.

    x: float32 [N, D] (centred), sq: [N] squared norms, rows: int64 [R] on x's device. Returns (squared distances
    [R, k] ascending, idx int64 [R, k]). Column tiles of `col_chunk` rows are scanned in order; each tile's k best
    are merged into a running top-k, so the working memory is one [R, col_chunk] tile plus [R, 2k] candidates.
    """
    n = x.shape[0]
    r = rows.shape[0]
    best_v = torch.full((r, k), float("inf"), device=x.device)
    best_i = torch.full((r, k), -1, dtype=torch.int64, device=x.device)
    q = x[rows]
    sq_q = sq[rows].unsqueeze(1)
    for c in range(0, n, col_chunk):
        d = min(c + col_chunk, n)
        # tile[r, j] = ||x_{c+j}||^2 - 2 q_r . x_{c+j} + ||q_r||^2, built in one buffer.
        tile = torch.addmm(sq[c:d].unsqueeze(0), q, x[c:d].T, beta=1.0, alpha=-2.0)
        tile.add_(sq_q)
        inside = torch.nonzero((rows >= c) & (rows < d)).squeeze(1)
        if inside.numel():  # the tile holds some of the query rows themselves: exclude self
            tile[inside, rows[inside] - c] = float("inf")
        v, i = torch.topk(tile, min(k, d - c), dim=1, largest=False, sorted=True)
        cand_v = torch.cat([best_v, v], dim=1)
        cand_i = torch.cat([best_i, i + c], dim=1)
        best_v, pos = torch.topk(cand_v, k, dim=1, largest=False, sorted=True)
        best_i = torch.gather(cand_i, 1, pos)
    return best_v, best_i


def prepare_embeddings(
    emb: np.ndarray | torch.Tensor, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centred float32 [N, D] on device, squared norms [N]). Centring: distances are translation-invariant and
    smaller norms mean less float32 cancellation in the ||q||^2 + ||x||^2 - 2 q.x expansion."""
    x = torch.as_tensor(emb).to(device=device, dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings have non-finite entries")
    x = x - x.mean(dim=0, keepdim=True)
    return x, (x * x).sum(dim=1)


def knn_chunked(
    emb: np.ndarray | torch.Tensor,
    k: int,
    chunk: int | None = None,
    col_chunk: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k-NN of every row among the other rows.

    emb: float [N, D]. Returns (dist float32 [N, k] ascending, idx int64 [N, k]); a row is never its own neighbour
    (duplicates of it can be). Query rows are processed `chunk` at a time (default 1024) against column tiles of
    `col_chunk` rows (default 32768) with one matmul per tile (squared-distance expansion) and torch.topk, merging
    the per-tile top-k: working memory is O(chunk * col_chunk) <= O(chunk * N), never N x N.
    Ties between equal distances are broken by torch.topk (deterministic for a fixed device and build).
    """
    x, sq = prepare_embeddings(emb, device)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1={n - 1}], got {k}")
    chunk = _KNN_ROW_CHUNK if chunk is None else int(chunk)
    col_chunk = _KNN_COL_CHUNK if col_chunk is None else int(col_chunk)
    if chunk < 1 or col_chunk < 1:
        raise ValueError(f"chunk and col_chunk must be >= 1, got {chunk}, {col_chunk}")
    dist = torch.empty((n, k), dtype=torch.float32)
    idx = torch.empty((n, k), dtype=torch.int64)
    t0 = time.perf_counter()
    next_report = 0.1
    with torch.no_grad():
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            val, ind = _knn_query_rows(x, sq, torch.arange(a, b, device=x.device), k, col_chunk)
            dist[a:b] = val.clamp_min_(0.0).sqrt_().cpu()
            idx[a:b] = ind.cpu()
            if progress and b / n >= next_report:
                el = time.perf_counter() - t0
                print(f"  knn {b}/{n} rows, {el:.1f}s elapsed, ~{el * (n - b) / b:.0f}s left", file=sys.stderr,
                      flush=True)
                next_report += 0.1
    return dist.numpy(), idx.numpy()


KNN_BACKENDS = ("auto", "faiss", "torch")
KNN_INDEXES = ("auto", "flat", "ivf")
# auto index on CPU: exact up to this N (an exact k-NN of 100k 256-d rows takes ~1-2 min on 2 cores; it grows as
# N^2), an IVF index above it.
FAISS_EXACT_MAX_N = 100_000
_FAISS_QUERY_BLOCK = 65536  # query rows per faiss search call (bounds the result buffers, paces the progress lines)


def _import_faiss(required: bool):
    """The faiss module, imported only when a k-NN asks for it; None (or ImportError if required) when absent."""
    try:
        import faiss  # noqa: PLC0415 -- optional dependency, imported where used
    except ImportError:
        if required:
            raise ImportError(
                "the faiss k-NN backend needs the faiss package: pip install faiss-cpu (faiss-gpu on CUDA), "
                "or choose the torch backend (--d2_knn torch)"
            ) from None
        return None
    return faiss


def _faiss_has_gpu(faiss) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def ivf_default_nlist(n: int) -> int:
    """IVF cells: ~4 sqrt(N) (the usual balance of coarse-quantiser and list-scan cost), at least 39 training
    points per cell (faiss's own minimum), at least 1."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def _drop_self(dist_sq: np.ndarray, idx: np.ndarray, row0: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From a search for k+1 neighbours of rows row0.. : drop each row's own index (or, if a duplicate pushed it
    out of the list, the last entry). Returns ([R, k], [R, k])."""
    r = idx.shape[0]
    own = np.arange(row0, row0 + r)[:, None]
    keep = idx != own
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    return dist_sq[keep].reshape(r, k), idx[keep].reshape(r, k)


def _faiss_search(index, x: np.ndarray, k: int, progress: bool, what: str) -> tuple[np.ndarray, np.ndarray]:
    """k-NN of every row of x in `index` (which holds x), self excluded: (squared dist float32 [N, k], idx)."""
    n = x.shape[0]
    dist = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    t0 = time.perf_counter()
    for a in range(0, n, _FAISS_QUERY_BLOCK):
        b = min(a + _FAISS_QUERY_BLOCK, n)
        d_blk, i_blk = index.search(x[a:b], k + 1)
        dist[a:b], idx[a:b] = _drop_self(d_blk, i_blk, a, k)
        if progress:
            el = time.perf_counter() - t0
            print(f"  {what} {b}/{n} rows, {el:.1f}s elapsed, ~{el * (n - b) / b:.0f}s left", file=sys.stderr,
                  flush=True)
    return dist, idx


def knn_recall(
    x: torch.Tensor, sq: torch.Tensor, idx: np.ndarray, queries: int, seed: int, k: int = 10
) -> tuple[float, int]:
    """recall@k of an approximate k-NN list against the exact one, on a seeded sample of query rows.

    x, sq: `prepare_embeddings` output; idx: int64 [N, >= k] approximate neighbours (ascending distance). The exact
    neighbours of the sampled rows come from a brute-force scan of all N rows (cheap: `queries` rows only).
    Returns (mean over the sample of |approx top-k & exact top-k| / k, k used = min(k, idx.shape[1])).
    """
    n = x.shape[0]
    k = min(k, idx.shape[1])
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    with torch.no_grad():
        _, exact = _knn_query_rows(x, sq, torch.as_tensor(rows, device=x.device), k, _KNN_COL_CHUNK)
    exact = exact.cpu().numpy()
    approx = idx[rows, :k]
    hits = sum(np.intersect1d(a, e).size for a, e in zip(approx, exact))
    return hits / (rows.size * k), k


def knn_graph(
    emb: np.ndarray | torch.Tensor,
    k: int,
    backend: str = "auto",
    index: str = "auto",
    device: str | torch.device = "cpu",
    nprobe: int = 8,
    nlist: int | None = None,
    recall_queries: int = 1000,
    seed: int = 0,
    chunk: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Euclidean k-NN of every row among the other rows: (dist float32 [N, k] ascending, idx int64 [N, k], info).

    backend 'torch': `knn_chunked` (exact) on `device`. backend 'faiss' (imported only here): index 'flat' is exact
    (IndexFlatL2; GpuIndexFlatL2 when `device` is CUDA and faiss has GPUs); index 'ivf' is approximate (IndexIVFFlat
    with `nlist` cells, default `ivf_default_nlist`, trained with 10 k-means iterations on a seeded sample of
    40 points per cell (faiss asks for >= 39), searched with `nprobe` cells: recall@10 0.996 at nprobe 8 on
    clustered data, 0.95 at 4). index 'auto': flat on a GPU or when N <= FAISS_EXACT_MAX_N, else ivf. backend 'auto': faiss when importable, except that a CUDA device without faiss-gpu keeps the exact
    torch path on the GPU; torch when faiss is absent. An approximate k-NN reports recall@10 (`knn_recall`) on
    `recall_queries` seeded query rows (0: skip). Rows the IVF search leaves short (fewer than k+1 points in the
    probed cells) are redone exactly. info: backend, index, seconds, and for ivf nlist, nprobe, recall.
    """
    if backend not in KNN_BACKENDS:
        raise ValueError(f"k-NN backend must be one of {KNN_BACKENDS}, got {backend!r}")
    if index not in KNN_INDEXES:
        raise ValueError(f"k-NN index must be one of {KNN_INDEXES}, got {index!r}")
    if nprobe < 1 or (nlist is not None and nlist < 1):
        raise ValueError(f"nprobe and nlist must be >= 1, got {nprobe}, {nlist}")
    on_cuda = torch.device(device).type == "cuda"
    faiss = _import_faiss(required=backend == "faiss") if backend != "torch" else None
    if backend == "auto":
        backend = "faiss" if faiss is not None and (not on_cuda or _faiss_has_gpu(faiss)) else "torch"
    t0 = time.perf_counter()
    if backend == "torch":
        if index == "ivf":
            raise ValueError("the torch k-NN backend is exact only: use index 'flat'/'auto', or the faiss backend")
        dist, idx = knn_chunked(emb, k, chunk=chunk, device=device, progress=progress)
        return dist, idx, {"knn_backend": "torch", "knn_index": "flat", "knn_seconds": time.perf_counter() - t0}
    x_t, sq = prepare_embeddings(emb, "cpu")
    n, dim = x_t.shape
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1={n - 1}], got {k}")
    x = x_t.numpy()
    use_gpu = on_cuda and _faiss_has_gpu(faiss)
    if index == "auto":
        index = "flat" if use_gpu or n <= FAISS_EXACT_MAX_N else "ivf"
    info: dict[str, Any] = {"knn_backend": "faiss-gpu" if use_gpu and index == "flat" else "faiss", "knn_index": index}
    if index == "flat":
        if use_gpu:
            resources = faiss.StandardGpuResources()
            flat = faiss.GpuIndexFlatL2(resources, dim)
        else:
            flat = faiss.IndexFlatL2(dim)
        flat.add(x)
        dist_sq, idx = _faiss_search(flat, x, k, progress, "faiss flat k-NN")
    else:
        cells = ivf_default_nlist(n) if nlist is None else min(int(nlist), n)
        quantiser = faiss.IndexFlatL2(dim)
        ivf = faiss.IndexIVFFlat(quantiser, dim, cells)
        ivf.cp.niter = 10
        ivf.cp.seed = int(seed)
        train_rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 40 * cells), replace=False))
        t_train = time.perf_counter()
        ivf.train(x[train_rows])
        ivf.add(x)
        ivf.nprobe = min(int(nprobe), cells)
        info.update(knn_nlist=cells, knn_nprobe=int(ivf.nprobe), knn_train_seconds=time.perf_counter() - t_train)
        dist_sq, idx = _faiss_search(ivf, x, k, progress, "faiss ivf k-NN")
        short = np.flatnonzero((idx < 0).any(axis=1))
        if short.size:  # too few points in the probed cells: exact neighbours for those rows
            with torch.no_grad():
                v, i = _knn_query_rows(x_t, sq, torch.as_tensor(short), k, _KNN_COL_CHUNK)
            dist_sq[short], idx[short] = v.numpy(), i.numpy()
        info["knn_rows_redone_exactly"] = int(short.size)
    dist = np.sqrt(np.maximum(dist_sq, 0.0)).astype(np.float32)
    info["knn_seconds"] = time.perf_counter() - t0
    if index == "ivf" and recall_queries > 0:
        t_rec = time.perf_counter()
        info["knn_recall"], info["knn_recall_k"] = knn_recall(x_t, sq, idx, recall_queries, seed)
        info["knn_recall_seconds"] = time.perf_counter() - t_rec
    return dist, idx, info


def default_gamma(dist: np.ndarray) -> float:
    """gamma = 1 / median k-NN distance, so a typical edge weighs exp(-1) whatever the embedding scale.

    Falls back to the mean positive distance when more than half the distances are 0 (duplicates), and to 1.0
    when all are.
    """
    d = np.asarray(dist, dtype=np.float64).ravel()
    med = float(np.median(d)) if d.size else 0.0
    if med > 0:
        return 1.0 / med
    pos = d[d > 0]
    return 1.0 / float(pos.mean()) if pos.size else 1.0


class NeighbourGraph(NamedTuple):
    """Undirected weighted k-NN graph in CSR form, shared by D2's forward and reverse message passing.

    indptr int64 [N+1]; cols int64 [E] (the neighbours of node i are cols[indptr[i]:indptr[i+1]], ascending);
    weight float64 [E] = exp(-gamma * d_ij).
    """

    indptr: np.ndarray
    cols: np.ndarray
    weight: np.ndarray

    @property
    def num_nodes(self) -> int:
        return self.indptr.size - 1


def neighbour_graph(dist: np.ndarray, idx: np.ndarray, gamma: float) -> NeighbourGraph:
    """The undirected graph of a k-NN list: j ~ i if j is in i's k-NN *or* i is in j's k-NN.

    dist, idx: [N, k]. Each pair appears once per direction, with the smaller of its two float32 distances, and
    weight exp(-gamma * d). Why undirected, for both passes as the D2 paper describes its graph: a node that lists
    another among its own nearest neighbours is as close to it as one of that node's k-NN; with directed lists only,
    nodes on the rim of a dense region (they point into it, its core does not point back) would neither pass their
    difficulty to the core in the forward pass nor be penalised when the core is selected in the reverse pass.
    """
    d = np.asarray(dist, dtype=np.float64)
    nb = np.asarray(idx, dtype=np.int64)
    if d.shape != nb.shape or d.ndim != 2:
        raise ValueError(f"shape mismatch: dist {d.shape}, idx {nb.shape}")
    n, k = nb.shape
    if nb.size and (nb.min() < 0 or nb.max() >= n):
        raise ValueError(f"neighbour indices must lie in [0, {n - 1}]")
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = nb.ravel()
    d = d.ravel()
    rows, cols, d = np.concatenate([rows, cols]), np.concatenate([cols, rows]), np.concatenate([d, d])
    key = rows * n + cols
    order = np.lexsort((d, key))  # by pair, smallest distance first, so the first of each pair is kept
    key, d = key[order], d[order]
    first = np.ones(key.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key, d = key[first], d[first]
    rows, cols = key // n, key % n
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
    return NeighbourGraph(indptr, cols, np.exp(-gamma * d))


def d2_forward(difficulty: np.ndarray, graph: NeighbourGraph, mode: str = "sum") -> np.ndarray:
    """Forward message passing: float64 [N] node scores.

    difficulty: [N]. message_i = sum over i's neighbours j in the undirected graph of w_ij * difficulty_j;
    score_i = difficulty_i + message_i ('sum') or difficulty_i * message_i ('product').
    """
    diff = np.asarray(difficulty, dtype=np.float64)
    if diff.ndim != 1 or diff.shape[0] != graph.num_nodes:
        raise ValueError(f"difficulty has shape {diff.shape}, the graph has {graph.num_nodes} nodes")
    rows = np.repeat(np.arange(graph.num_nodes), np.diff(graph.indptr))
    message = np.bincount(rows, weights=graph.weight * diff[graph.cols], minlength=graph.num_nodes)
    if mode == "sum":
        return diff + message
    if mode == "product":
        return diff * message
    raise ValueError(f"mode must be 'sum' or 'product', got {mode!r}")


def _select_absolute(
    s: np.ndarray, selected: np.ndarray, out: list[int], n_select: int, graph: NeighbourGraph
) -> None:
    """Greedy argmax selection with a lazy max-heap; mutates s, selected, out.

    Scores only decrease (decrements are clamped at a non-negative selected score), so a heap key is always an
    upper bound of the node's current score: a top entry whose key is stale is replaced by the current score (one
    sift), and a top entry whose key is current is the true argmax (ties: lowest index). Each pick costs O(log N)
    plus its degree, never a rescan of N. The loop runs on Python floats and lists, not numpy scalars: per pick
    it touches ~2k values, where numpy's per-call overhead (microseconds) would dominate; the arithmetic is the
    same IEEE float64 (s_j - w_ij * s_i), so the picks are those of the vectorised formula.
    """
    scores = s.tolist()
    indptr = graph.indptr.tolist()
    cols, weight = graph.cols, graph.weight
    heap = [(-scores[i], i) for i in np.flatnonzero(~selected).tolist()]
    heapq.heapify(heap)
    heappop, heapreplace = heapq.heappop, heapq.heapreplace
    picked = []
    need = n_select - len(out)
    while len(picked) < need:
        neg, i = heap[0]
        cur = scores[i]
        if -neg != cur:
            heapreplace(heap, (-cur, i))
            continue
        heappop(heap)
        picked.append(i)
        if cur > 0:
            a, b = indptr[i], indptr[i + 1]
            for j, w in zip(cols[a:b].tolist(), weight[a:b].tolist()):
                scores[j] -= w * cur
    out.extend(picked)
    selected[picked] = True
    s[:] = scores


def _select_weighted(
    s: np.ndarray, selected: np.ndarray, out: list[int], n_select: int, graph: NeighbourGraph,
    rng: np.random.Generator,
) -> None:
    """Sequential sampling with probability proportional to max(score, 0); mutates s, selected, out.

    Exact sequential sampling (each pick sees the scores lowered by all earlier picks), made cheap with a two-level
    (sqrt-decomposition) sum tree: masses p live in blocks of B ~ sqrt(N); a pick draws one uniform, finds its block
    by a cumulative sum over the N/B block sums and the node by a cumulative sum inside the block; after the
    neighbours' scores drop, only the touched blocks' sums are recomputed (from scratch, so no float drift).
    O(sqrt(N) + degree) per pick, one rng.random() per pick: deterministic from rng. When no positive mass is left
    (every remaining score <= 0) the remaining picks follow the absolute (argmax) rule.
    """
    n = s.size
    indptr, cols, weight = graph
    bsize = max(64, int(math.isqrt(n)))
    nblocks = -(-n // bsize)
    p = np.zeros(nblocks * bsize, dtype=np.float64)
    p[:n] = np.where(selected, 0.0, np.maximum(s, 0.0))
    p2 = p.reshape(nblocks, bsize)
    bsum = p2.sum(axis=1)
    while len(out) < n_select:
        csum = np.cumsum(bsum)
        total = csum[-1]
        if not total > 0:
            _select_absolute(s, selected, out, n_select, graph)
            return
        u = rng.random() * total
        blk = min(int(np.searchsorted(csum, u, side="right")), nblocks - 1)
        while bsum[blk] <= 0:  # float edge cases: u landed on the boundary of an empty block
            blk -= 1
        inner = np.cumsum(p2[blk])
        j = min(int(np.searchsorted(inner, u - (csum[blk] - bsum[blk]), side="right")), bsize - 1)
        while p2[blk, j] <= 0:
            j -= 1
        i = blk * bsize + j
        cur = s[i]
        selected[i] = True
        out.append(i)
        p[i] = 0.0
        touched = [blk]
        if cur > 0:
            a, b = indptr[i], indptr[i + 1]
            nb = cols[a:b]
            s[nb] -= weight[a:b] * cur
            p[nb] = np.where(selected[nb], 0.0, np.maximum(s[nb], 0.0))
            touched = np.unique(np.concatenate([nb // bsize, [blk]]))
        bsum[touched] = p2[touched].sum(axis=1)


def d2_select(
    scores: np.ndarray,
    graph: NeighbourGraph,
    n_select: int,
    sampling: str = "absolute",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Reverse message passing selection: int64 [n_select] sorted indices.

    Repeatedly pick an unselected node ('absolute': the highest current score, ties to the lowest index;
    'weighted': sampled with probability proportional to max(current score, 0)), then lower every neighbour j's
    score (in the undirected `graph`) by w_ij * max(score of the picked node, 0). The clamp at 0 (a departure
    from the published code, which subtracts w_ij * score unclamped): a node whose score has already fallen to <= 0
    is explained by earlier picks and must not *raise* its neighbours' scores; it also keeps scores monotone for
    the lazy heap. `rng` is only used by 'weighted' (default: np.random.default_rng(0)).
    """
    s = np.array(scores, dtype=np.float64)
    n = s.size
    if s.ndim != 1 or n != graph.num_nodes:
        raise ValueError(f"scores have shape {s.shape}, the graph has {graph.num_nodes} nodes")
    if not 0 <= n_select <= n:
        raise ValueError(f"cannot select {n_select} of {n} nodes")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores have non-finite entries")
    selected = np.zeros(n, dtype=bool)
    out: list[int] = []
    if sampling == "absolute":
        _select_absolute(s, selected, out, n_select, graph)
    elif sampling == "weighted":
        _select_weighted(s, selected, out, n_select, graph, rng if rng is not None else np.random.default_rng(0))
    else:
        raise ValueError(f"sampling must be 'absolute' or 'weighted', got {sampling!r}")
    return np.sort(np.asarray(out, dtype=np.int64))


def d2_prune(
    difficulty: np.ndarray,
    embeddings: np.ndarray,
    ratio: float,
    neighbors: int = 10,
    gamma: float | None = None,
    mode: str = "sum",
    sampling: str = "absolute",
    rng: np.random.Generator | None = None,
    chunk: int | None = None,
    device: str = "cpu",
    knn_backend: str = "auto",
    knn_index: str = "auto",
    nprobe: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The whole D2 pipeline: k-NN (`knn_graph`) -> undirected graph -> forward -> reverse selection of
    round((1-ratio)*N) samples.

    difficulty: [N]; embeddings: [N, D]. Returns (kept int64 sorted, stats: gamma, the k-NN's info (backend,
    index, recall@10 of an approximate index) and stage timings). gamma=None: `default_gamma` of the k-NN distances.
    """
    diff = np.asarray(difficulty, dtype=np.float64)
    if embeddings.shape[0] != diff.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {diff.shape[0]} difficulties")
    dist, idx, info = knn_graph(embeddings, neighbors, backend=knn_backend, index=knn_index, device=device,
                                nprobe=nprobe, seed=seed, chunk=chunk, progress=progress)
    t1 = time.perf_counter()
    g = default_gamma(dist) if gamma is None else float(gamma)
    graph = neighbour_graph(dist, idx, g)
    scores = d2_forward(diff, graph, mode=mode)
    t2 = time.perf_counter()
    kept = d2_select(scores, graph, kept_size(diff.size, ratio), sampling=sampling, rng=rng)
    t3 = time.perf_counter()
    return kept, {"gamma": g, **info, "graph_forward_seconds": t2 - t1, "select_seconds": t3 - t2}


# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------
def impute_history(history: np.ndarray) -> tuple[np.ndarray, int]:
    """Fill NaN (sample not seen in an epoch, e.g. a dropped last batch) of a float [J, N] loss history.

    A missing entry gets the sample's mean over its recorded epochs; a sample never seen gets each epoch's dataset
    mean (so its volatility is 0 and Dyn-Unc treats it as stable). Returns (float64 [J, N], number imputed).
    """
    h = np.asarray(history, dtype=np.float64).copy()
    missing = np.isnan(h)
    count = int(missing.sum())
    if count == 0:
        return h, 0
    seen_any = (~missing).any(axis=0)
    with np.errstate(invalid="ignore"):
        sample_mean = np.nanmean(np.where(seen_any, h, 0.0), axis=0)  # [N]; unseen columns handled below
        epoch_mean = np.nanmean(h, axis=1)  # [J]
    fill = np.where(seen_any[None, :], sample_mean[None, :], epoch_mean[:, None])
    h[missing] = fill[missing]
    if np.isnan(h).any():
        raise ValueError("a warm-up epoch recorded no loss at all")
    return h, count


class _StaticBase(_Base):
    """Warm-up on full data for J epochs recording losses, select once at the end of epoch J-1, then keep the
    subset fixed. `subset` (int64 sorted, or None before the decision) is what the engine saves as kept_static.npy."""

    def __init__(self, num_samples: int, warmup_epochs: int, prune_ratio: float, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if warmup_epochs < 1:
            raise ValueError(f"warmup_epochs must be >= 1, got {warmup_epochs}")
        self.num_samples = int(num_samples)
        self.warmup_epochs = int(warmup_epochs)
        self.prune_ratio = float(prune_ratio)
        self.seed = int(seed)
        self.n_keep = kept_size(self.num_samples, self.prune_ratio)
        self.history = np.full((self.warmup_epochs, self.num_samples), np.nan, dtype=np.float32)
        self.subset: np.ndarray | None = None

    def _warmup_plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(kept=np.arange(self.num_samples, dtype=np.int64), record_losses=True)

    def plan_epoch(self, epoch: int) -> EpochPlan:
        if epoch < self.warmup_epochs:
            return self._warmup_plan(epoch)
        if self.subset is None:
            raise RuntimeError(
                f"{self.name}: epoch {epoch} needs the subset selected at the end of warm-up epoch "
                f"{self.warmup_epochs - 1}, but end_epoch({self.warmup_epochs - 1}) was never called"
            )
        return EpochPlan(kept=self.subset.copy(), record_losses=False)

    def _select(self, history: np.ndarray, embeddings: np.ndarray | None) -> dict[str, Any]:
        raise NotImplementedError

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        n = self.num_samples
        if epoch >= self.warmup_epochs:
            if self.subset is None:
                raise RuntimeError(f"{self.name}: end_epoch({epoch}) before the subset was selected")
            return {"kept": int(self.subset.size), "epoch_prune_ratio": 1.0 - self.subset.size / n}
        if losses is None:
            raise ValueError(f"{self.name}: warm-up epoch {epoch} needs its recorded losses")
        self.history[epoch] = losses.mean.astype(np.float32)
        log: dict[str, Any] = {"kept": n, "epoch_prune_ratio": 0.0}
        if epoch == self.warmup_epochs - 1:
            t0 = time.perf_counter()
            history, imputed = impute_history(self.history)
            stats = self._select(history, embeddings)
            log.update({f"{self.name}_{key}": value for key, value in stats.items()})
            log[f"{self.name}_imputed_losses"] = imputed
            log[f"{self.name}_selected"] = int(self.subset.size) if self.subset is not None else 0
            log[f"{self.name}_select_seconds"] = time.perf_counter() - t0
        return log

    def _base_state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "warmup_epochs": self.warmup_epochs,
            "prune_ratio": self.prune_ratio,
            "seed": self.seed,
            "history": torch.from_numpy(self.history.copy()),
            "subset": None if self.subset is None else torch.from_numpy(self.subset.copy()),
        }

    def state_dict(self) -> dict[str, Any]:
        return self._base_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the recorded history and the subset; hyper-parameters stay the constructor's."""
        self._check_state(state)
        history = state["history"].numpy().astype(np.float32, copy=True)
        if history.shape != self.history.shape:
            raise ValueError(f"state_dict history has shape {history.shape}, expected {self.history.shape}")
        self.history = history
        subset = state.get("subset")
        self.subset = None if subset is None else subset.numpy().astype(np.int64, copy=True)


class DynUnc(_StaticBase):
    """Dyn-Unc as a static selector: epochs 0..J-1 full data with losses recorded; at the end of epoch J-1 keep
    the round((1-r)*N) samples of highest dynamic uncertainty (window w over the J epochs) for all later epochs."""

    name = "dynunc"

    def __init__(self, num_samples: int, warmup_epochs: int, prune_ratio: float, window: int, seed: int = 0) -> None:
        super().__init__(num_samples, warmup_epochs, prune_ratio, seed)
        if not 2 <= window <= warmup_epochs:
            raise ValueError(f"window must be in [2, warmup_epochs={warmup_epochs}], got {window}")
        self.window = int(window)

    def _select(self, history: np.ndarray, embeddings: np.ndarray | None) -> dict[str, Any]:
        scores = dynunc_scores(history, self.window)
        self.subset = top_k_indices(scores, self.n_keep)
        return {"score_mean": float(scores.mean()), "score_kept_min": float(scores[self.subset].min())}


class D2Pruning(_StaticBase):
    """D2 Pruning as a static selector.

    Epochs 0..J-1 full data with losses recorded; the last warm-up epoch (J-1) also asks the engine for unmasked,
    mean-pooled encoder embeddings. Difficulty = the sample's mean loss over the J warm-up epochs (MAE's per-sample
    loss depends on the random mask, so one epoch is noisy; averaging the recorded epochs is cheaper than another
    pass and less noisy). At the end of epoch J-1: k-NN (k = neighbors) of the embeddings, forward message passing
    ('sum' or 'product'), reverse message passing selection of round((1-r)*N) samples ('absolute' or 'weighted',
    the latter with epoch_rng(seed, J-1, ...)). gamma=None: 1 / median k-NN distance (see `default_gamma`).
    The k-NN runs through `knn_graph` (knn_backend / knn_index / nprobe: see there) on `knn_device`.
    """

    name = "d2"

    def __init__(
        self,
        num_samples: int,
        warmup_epochs: int,
        prune_ratio: float,
        neighbors: int = 10,
        gamma: float | None = None,
        mode: str = "sum",
        sampling: str = "absolute",
        seed: int = 0,
        knn_device: str = "cpu",
        knn_backend: str = "auto",
        knn_index: str = "auto",
        nprobe: int = 8,
    ) -> None:
        super().__init__(num_samples, warmup_epochs, prune_ratio, seed)
        if not 1 <= neighbors < num_samples:
            raise ValueError(f"neighbors must be in [1, N-1={num_samples - 1}], got {neighbors}")
        if mode not in ("sum", "product"):
            raise ValueError(f"mode must be 'sum' or 'product', got {mode!r}")
        if sampling not in ("absolute", "weighted"):
            raise ValueError(f"sampling must be 'absolute' or 'weighted', got {sampling!r}")
        if gamma is not None and not gamma > 0:
            raise ValueError(f"gamma must be > 0 or None, got {gamma}")
        if knn_backend not in KNN_BACKENDS or knn_index not in KNN_INDEXES:
            raise ValueError(f"knn_backend must be one of {KNN_BACKENDS} and knn_index one of {KNN_INDEXES}, "
                             f"got {knn_backend!r}, {knn_index!r}")
        if knn_backend == "torch" and knn_index == "ivf":
            raise ValueError("knn_index 'ivf' needs the faiss backend (the torch k-NN is exact only)")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.neighbors = int(neighbors)
        self.gamma = None if gamma is None else float(gamma)
        self.mode = mode
        self.sampling = sampling
        self.knn_device = knn_device
        self.knn_backend = knn_backend
        self.knn_index = knn_index
        self.nprobe = int(nprobe)
        self.gamma_used: float | None = None

    def _warmup_plan(self, epoch: int) -> EpochPlan:
        plan = super()._warmup_plan(epoch)
        plan.compute_embeddings = epoch == self.warmup_epochs - 1
        return plan

    def _select(self, history: np.ndarray, embeddings: np.ndarray | None) -> dict[str, Any]:
        if embeddings is None:
            raise ValueError("d2: the last warm-up epoch needs the embeddings (plan.compute_embeddings was True)")
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != self.num_samples:
            raise ValueError(f"d2: embeddings must have shape ({self.num_samples}, D), got {emb.shape}")
        difficulty = history.mean(axis=0)
        rng = epoch_rng(self.seed, self.warmup_epochs - 1, _PURPOSE_D2_WEIGHTED)
        self.subset, stats = d2_prune(
            difficulty, emb, self.prune_ratio, neighbors=self.neighbors, gamma=self.gamma, mode=self.mode,
            sampling=self.sampling, rng=rng, device=self.knn_device, knn_backend=self.knn_backend,
            knn_index=self.knn_index, nprobe=self.nprobe, seed=self.seed,
        )
        self.gamma_used = stats["gamma"]
        return stats

    def state_dict(self) -> dict[str, Any]:
        state = self._base_state()
        state["gamma_used"] = self.gamma_used
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gamma_used = state.get("gamma_used")


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
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
