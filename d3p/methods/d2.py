"""D2 Pruning (Maharana et al., 2023), adapted to MAE: k-NN graph of warm-up encoder embeddings (faiss:
exact, or IVF at scale; or the exact chunked torch path), made undirected, forward message passing of the
difficulty (loss), then reverse message passing while selecting."""
from __future__ import annotations

import heapq
import math
import sys
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from d3p.methods.common import PRUNE_RATIO, kept_size
from d3p.methods.static_base import STATIC_WARMUP, StaticSelector, check_warmup
from d3p.registry import Option, register_method
from d3p.strategy import EpochPlan, epoch_rng


# k-NN tiling: a [rows x cols] float32 distance tile of 1024 x 32768 (128 MiB) was as fast as any shape we tried
# on a 2-core CPU (measured back to back at N = 1.28M: ~44 GFLOPS vs ~17 for a single [52 x N] slab of the same
# memory, which re-reads all of x for a handful of rows); on a GPU larger row chunks pay off (pass chunk=).
_KNN_ROW_CHUNK = 1024
_KNN_COL_CHUNK = 32768


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


_PURPOSE_D2_WEIGHTED = 41


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


class D2Pruning(StaticSelector):
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

    def warmup_plan(self, epoch: int) -> EpochPlan:
        plan = super().warmup_plan(epoch)
        plan.compute_embeddings = epoch == self.warmup_epochs - 1
        return plan

    def select(self, history: np.ndarray, embeddings: np.ndarray | None) -> dict[str, Any]:
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
        state = self.base_state()
        state["gamma_used"] = self.gamma_used
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gamma_used = state.get("gamma_used")


# ------------------------------------------------------------------------------------------------ registration
D2_OPTIONS = (
    PRUNE_RATIO,
    STATIC_WARMUP,
    Option("d2_neighbors", 10, int),
    Option("d2_gamma", None, float, "default: 1 / median k-NN distance"),
    Option("d2_mode", "sum", choices=("sum", "product")),
    Option("d2_sampling", "absolute", choices=("weighted", "absolute")),
    Option("d2_knn", "auto", choices=("auto", "faiss", "torch"),
           help="k-NN backend: faiss when installed (faiss-gpu on CUDA), else exact chunked torch"),
    Option("d2_knn_index", "auto", choices=("auto", "flat", "ivf"),
           help="faiss index: flat (exact) or ivf (approximate); auto: flat on GPU or N <= 100k, else ivf"),
    Option("d2_nprobe", 8, int, "ivf: cells searched per query", valid=lambda p: p >= 1, rule="must be >= 1"),
)


def _check_d2(o: dict[str, Any], epochs: int | None) -> list[str]:
    problems = check_warmup(o, epochs)
    if o["d2_knn"] == "torch" and o["d2_knn_index"] == "ivf":
        problems.append("--d2_knn_index ivf needs --d2_knn faiss or auto (the torch k-NN is exact only)")
    return problems


@register_method("d2", "static", D2_OPTIONS, check=_check_d2,
                 help="D2 Pruning: message passing on a k-NN graph of the embeddings (static)")
def build_d2(num_samples: int, seed: int, knn_device: str, prune_ratio: float, static_warmup_epochs: int,
             d2_neighbors: int, d2_gamma: float | None, d2_mode: str, d2_sampling: str, d2_knn: str,
             d2_knn_index: str, d2_nprobe: int) -> D2Pruning:
    # the k-NN runs on the training device (faiss-gpu or torch on CUDA; faiss IVF at scale on CPU)
    return D2Pruning(num_samples, static_warmup_epochs, prune_ratio, d2_neighbors, d2_gamma, d2_mode, d2_sampling,
                     seed=seed, knn_device=knn_device, knn_backend=d2_knn, knn_index=d2_knn_index, nprobe=d2_nprobe)
