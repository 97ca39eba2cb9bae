"""Tests of the static selectors (d3p/static.py): Dyn-Unc, D2 Pruning, their strategies and the CLI."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d3p.methods.d2 import (
    D2Pruning, NeighbourGraph, d2_forward, d2_prune, d2_select, default_gamma, knn_chunked, knn_graph, neighbour_graph,
)
from d3p.methods.dynunc import DynUnc, dynunc_scores, dynunc_select
from d3p.methods.static_base import impute_history
from d3p.static import main
from d3p.strategy import EpochLosses

REPO = Path(__file__).resolve().parents[2]  # tests/library/ -> the repository


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def full_losses(values: np.ndarray) -> EpochLosses:
    return EpochLosses(loss_sum=values.astype(np.float64), count=np.ones(values.size, dtype=np.int32))


# ------------------------------------------------------------------------------------------------------------------
# Dyn-Unc
# ------------------------------------------------------------------------------------------------------------------
def test_dynunc_scores_match_reference_loop():
    h = np.random.default_rng(0).uniform(0, 1, size=(7, 50)).astype(np.float32)
    w = 3
    ref = np.mean([np.std(h[k : k + w].astype(np.float64), axis=0) for k in range(7 - w + 1)], axis=0)
    np.testing.assert_allclose(dynunc_scores(h, w), ref, rtol=1e-12)
    np.testing.assert_allclose(dynunc_scores(h, w, column_chunk=8), ref, rtol=1e-12)


def _volatile_history(n: int = 1000, n_volatile: int = 300, epochs: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Smoothly decreasing losses, plus a random set of samples whose loss oscillates (high volatility)."""
    rng = np.random.default_rng(1)
    t = np.arange(epochs)[:, None]
    h = 1.0 - 0.05 * t + rng.normal(0, 0.002, size=(epochs, n))
    volatile = np.sort(rng.choice(n, n_volatile, replace=False))
    amp = rng.uniform(0.1, 0.3, n_volatile)
    h[:, volatile] += amp * np.where(t % 2 == 0, 1.0, -1.0)
    return h.astype(np.float32), volatile


def test_dynunc_keeps_volatile_samples():
    h, volatile = _volatile_history()
    kept = dynunc_select(h, window=3, ratio=0.7)  # keep round(0.3 * 1000) = 300
    assert kept.dtype == np.int64 and kept.size == 300
    np.testing.assert_array_equal(kept, volatile)
    kept = dynunc_select(h, window=3, ratio=0.8)  # 200 of the volatile ones, exactly
    assert kept.size == 200 and np.isin(kept, volatile).all()
    assert dynunc_select(h, window=2, ratio=0.333).size == round(0.667 * 1000)


def test_dynunc_ties_break_by_index_and_bad_input():
    h = np.ones((4, 10), dtype=np.float32)
    np.testing.assert_array_equal(dynunc_select(h, 2, 0.5), np.arange(5))
    with pytest.raises(ValueError, match="window"):
        dynunc_scores(h, 5)
    with pytest.raises(ValueError, match="window"):
        dynunc_scores(h, 1)
    h[0, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        dynunc_scores(h, 2)


def test_impute_history():
    h = np.array([[1.0, np.nan, np.nan], [3.0, 2.0, np.nan], [np.nan, 4.0, np.nan]])
    filled, count = impute_history(h)
    assert count == 5
    np.testing.assert_allclose(filled, [[1.0, 3.0, 1.0], [3.0, 2.0, 2.5], [2.0, 4.0, 4.0]])


def _drive_static(strategy, epochs, losses_of, embeddings_of=None):
    out = []
    for epoch in epochs:
        plan = strategy.plan_epoch(epoch)
        losses = full_losses(losses_of(epoch)) if plan.record_losses else None
        emb = embeddings_of() if plan.compute_embeddings else None
        log = strategy.end_epoch(epoch, losses, emb)
        out.append((plan.kept.copy(), plan.record_losses, plan.compute_embeddings, log))
    return out


def test_dynunc_strategy_and_resume():
    h, volatile = _volatile_history(n=400, n_volatile=100, epochs=4)

    def make():
        return DynUnc(400, warmup_epochs=4, prune_ratio=0.75, window=3, seed=0)

    s = make()
    run = _drive_static(s, range(7), lambda e: h[e])
    for epoch in range(4):
        kept, record, _, log = run[epoch]
        assert kept.size == 400 and record and log["kept"] == 400
    assert run[3][3]["dynunc_selected"] == 100
    np.testing.assert_array_equal(s.subset, volatile)
    np.testing.assert_array_equal(s.subset, dynunc_select(h, 3, 0.75))
    for epoch in range(4, 7):
        kept, record, _, log = run[epoch]
        np.testing.assert_array_equal(kept, volatile)
        assert not record and log["kept"] == 100
    for split in (2, 5):  # interrupted during warm-up and after the decision
        first = make()
        part = _drive_static(first, range(split), lambda e: h[e])
        resumed = make()
        resumed.load_state_dict(roundtrip(first.state_dict()))
        part += _drive_static(resumed, range(split, 7), lambda e: h[e])
        for a, b in zip(run, part):
            np.testing.assert_array_equal(a[0], b[0])
            assert a[1:3] == b[1:3]
            assert {k: v for k, v in a[3].items() if not k.endswith("seconds")} == \
                   {k: v for k, v in b[3].items() if not k.endswith("seconds")}
    with pytest.raises(RuntimeError, match="end_epoch"):
        make().plan_epoch(4)


# ------------------------------------------------------------------------------------------------------------------
# D2: k-NN
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk, col_chunk", [(1, 250), (7, 3), (64, 33), (250, 250), (1000, None), (None, 8)])
def test_knn_chunked_equals_brute_force(chunk, col_chunk):
    emb = np.random.default_rng(2).normal(size=(250, 16)).astype(np.float32) + 5.0  # offset: tests the centring
    dist, idx = knn_chunked(emb, 6, chunk=chunk, col_chunk=col_chunk)
    x = torch.from_numpy(emb).double()
    full = torch.cdist(x, x)
    full.fill_diagonal_(float("inf"))
    ref_d, ref_i = torch.topk(full, 6, dim=1, largest=False)
    assert dist.shape == (250, 6) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_i.numpy())
    np.testing.assert_allclose(dist, ref_d.numpy(), atol=1e-4)
    assert not np.any(idx == np.arange(250)[:, None])


def test_knn_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        knn_chunked(np.zeros((5, 2), dtype=np.float32), 5)


def _gaussian_mixture(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Clustered float32 [n, dim] embeddings: a mixture of `centres` Gaussians (like encoder features)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centres, dim)) * 3.0
    return (mu[rng.integers(0, centres, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _same_neighbour_sets(emb, dist_a, idx_a, dist_b, idx_b, atol=1e-4) -> None:
    """Identical k-NN sets row by row, ties aside: a member in only one of the two lists must lie (in float64)
    at the k-th distance, where either choice is exact."""
    np.testing.assert_allclose(dist_a, dist_b, atol=atol)
    x = emb.astype(np.float64)
    differ = [r for r in range(idx_a.shape[0]) if set(idx_a[r]) != set(idx_b[r])]
    for r in differ:
        swapped = np.array(sorted(set(idx_a[r]) ^ set(idx_b[r])))
        d = np.linalg.norm(x[swapped] - x[r], axis=1)
        np.testing.assert_allclose(d, dist_a[r, -1], atol=atol)
    assert len(differ) <= 3


def test_faiss_flat_equals_exact_torch_path():
    emb = _gaussian_mixture(1500, 32, 20, seed=1) + 7.0
    ref_d, ref_i = knn_chunked(emb, 10)
    dist, idx, info = knn_graph(emb, 10, backend="faiss", index="auto")
    assert info["knn_backend"] == "faiss" and info["knn_index"] == "flat" and "knn_recall" not in info
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (1500, 10)
    assert not np.any(idx == np.arange(1500)[:, None])
    _same_neighbour_sets(emb, dist, idx, ref_d, ref_i)
    # auto backend picks faiss when it is installed; torch stays exact and reports itself
    assert knn_graph(emb, 10)[2]["knn_backend"] == "faiss"
    d_t, i_t, info_t = knn_graph(emb, 10, backend="torch")
    assert info_t["knn_backend"] == "torch"
    np.testing.assert_array_equal(i_t, ref_i)


def test_faiss_flat_excludes_self_among_duplicates():
    emb = np.repeat(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32), 3, axis=0)  # triplets
    dist, idx, _ = knn_graph(emb, 4, backend="faiss", index="flat")
    assert not np.any(idx == np.arange(150)[:, None])
    np.testing.assert_allclose(dist[:, :2], 0.0, atol=1e-3)  # the two copies come first
    assert np.all(idx[:, :2] // 3 == np.arange(150)[:, None] // 3)


def test_faiss_ivf_recall_on_clustered_data():
    emb = _gaussian_mixture(20000, 64, 200, seed=2)
    dist, idx, info = knn_graph(emb, 10, backend="faiss", index="ivf", nprobe=8, recall_queries=500, seed=3)
    assert info["knn_index"] == "ivf" and info["knn_nlist"] == 512 and info["knn_nprobe"] == 8
    assert info["knn_recall_k"] == 10 and info["knn_recall"] >= 0.95
    assert not np.any(idx == np.arange(20000)[:, None]) and np.all(idx >= 0)
    assert np.all(np.diff(dist, axis=1) >= 0)
    # the recall figure is a real measurement: one probed cell misses neighbours (and leaves rows short, which
    # are redone exactly)
    _, idx1, info1 = knn_graph(emb, 10, backend="faiss", index="ivf", nprobe=1, recall_queries=500, seed=3)
    assert info1["knn_recall"] < 0.9 and info1["knn_rows_redone_exactly"] > 0 and np.all(idx1 >= 0)
    # deterministic: the same seed gives the same graph and the same recall sample
    dist2, idx2, info2 = knn_graph(emb, 10, backend="faiss", index="ivf", nprobe=8, recall_queries=500, seed=3)
    np.testing.assert_array_equal(idx, idx2)
    assert info2["knn_recall"] == info["knn_recall"]


def test_knn_graph_rejects_bad_options():
    emb = np.zeros((20, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="backend"):
        knn_graph(emb, 3, backend="annoy")
    with pytest.raises(ValueError, match="exact only"):
        knn_graph(emb, 3, backend="torch", index="ivf")
    with pytest.raises(ValueError, match="nprobe"):
        knn_graph(emb, 3, nprobe=0)


def test_d2_prune_faiss_equals_torch_on_small_n():
    emb = _gaussian_mixture(1000, 16, 10, seed=4)
    difficulty = np.random.default_rng(4).uniform(0.2, 1.0, 1000)
    kept_t, stats_t = d2_prune(difficulty, emb, 0.5, knn_backend="torch")
    kept_f, stats_f = d2_prune(difficulty, emb, 0.5, knn_backend="faiss")
    assert stats_t["knn_backend"] == "torch" and stats_f["knn_backend"] == "faiss" and kept_f.size == 500
    assert stats_f["gamma"] == pytest.approx(stats_t["gamma"], rel=1e-5)
    np.testing.assert_array_equal(kept_f, kept_t)


def test_default_gamma():
    assert default_gamma(np.array([[1.0, 2.0], [3.0, 4.0]])) == pytest.approx(1 / 2.5)
    assert default_gamma(np.array([[0.0, 0.0], [0.0, 4.0]])) == pytest.approx(1 / 4.0)
    assert default_gamma(np.zeros((2, 2))) == 1.0


# ------------------------------------------------------------------------------------------------------------------
# D2: forward and reverse message passing
# ------------------------------------------------------------------------------------------------------------------
def _dense_weights(dist: np.ndarray, idx: np.ndarray, gamma: float) -> np.ndarray:
    """Reference undirected weight matrix: W[i, j] = W[j, i] = exp(-gamma * d) if j in kNN(i) or i in kNN(j)
    (the smaller distance when both)."""
    n = idx.shape[0]
    w = np.zeros((n, n))
    for i in range(n):
        for j, d in zip(idx[i], dist[i]):
            w[i, j] = w[j, i] = max(w[i, j], np.exp(-gamma * d))
    return w


@pytest.mark.parametrize("mode", ["sum", "product"])
def test_d2_forward_difficult_neighbours_raise_score(mode):
    # Node 0's neighbours are 1 and 2; node 3's neighbours are 4 and 5, at the same distances.
    idx = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
    dist = np.full((6, 2), 0.5)
    difficulty = np.array([1.0, 5.0, 5.0, 1.0, 0.1, 0.1])  # equal own difficulty, hard vs easy neighbours
    scores = d2_forward(difficulty, neighbour_graph(dist, idx, gamma=1.0), mode=mode)
    assert scores[0] > scores[3]
    message0 = 2 * np.exp(-0.5) * 5.0
    expected0 = 1.0 + message0 if mode == "sum" else 1.0 * message0
    assert scores[0] == pytest.approx(expected0)
    with pytest.raises(ValueError, match="mode"):
        d2_forward(difficulty, neighbour_graph(dist, idx, 1.0), mode="max")


@pytest.mark.parametrize("mode", ["sum", "product"])
def test_d2_forward_graph_is_undirected(mode):
    # Node 3 lists node 0 as its nearest neighbour, node 0 does not list node 3: in the undirected graph (the
    # paper's) node 0 still receives node 3's difficulty.
    idx = np.array([[1, 2], [0, 2], [0, 1], [0, 1]])
    dist = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.2, 0.9]])
    difficulty = np.array([1.0, 2.0, 3.0, 4.0])
    scores = d2_forward(difficulty, neighbour_graph(dist, idx, gamma=1.0), mode=mode)
    message0 = np.exp(-0.5) * 2.0 + np.exp(-0.5) * 3.0 + np.exp(-0.2) * 4.0
    assert scores[0] == pytest.approx(1.0 + message0 if mode == "sum" else message0, rel=1e-12)
    # On a random k-NN graph: equal to the dense symmetric reference, W @ difficulty.
    rng = np.random.default_rng(4)
    dist, idx = knn_chunked(rng.normal(size=(120, 5)).astype(np.float32), 4)
    gamma = default_gamma(dist)
    diff = rng.uniform(0.2, 1.0, 120)
    w = _dense_weights(dist.astype(np.float64), idx, gamma)
    np.testing.assert_array_equal(w, w.T)
    message = w @ diff
    expected = diff + message if mode == "sum" else diff * message
    np.testing.assert_allclose(d2_forward(diff, neighbour_graph(dist, idx, gamma), mode=mode), expected, rtol=1e-12)


def test_neighbour_graph_csr():
    idx = np.array([[1, 2], [0, 2], [0, 1], [0, 1]])
    dist = np.array([[0.5, 0.6], [0.5, 0.7], [0.6, 0.7], [0.2, 0.9]])
    g = neighbour_graph(dist, idx, gamma=2.0)
    assert isinstance(g, NeighbourGraph) and g.num_nodes == 4
    np.testing.assert_array_equal(g.indptr, [0, 3, 6, 8, 10])
    np.testing.assert_array_equal(g.cols, [1, 2, 3, 0, 2, 3, 0, 1, 0, 1])
    np.testing.assert_allclose(g.weight[:3], np.exp(-2.0 * np.array([0.5, 0.6, 0.2])))
    with pytest.raises(ValueError, match="neighbour indices"):
        neighbour_graph(dist, np.array([[1, 2], [0, 2], [0, 1], [0, 4]]), 1.0)


def _naive_select(scores, dist, idx, gamma, n_select, rng=None):
    """Reference: O(N) rescan per pick on a dense symmetric weight matrix."""
    n = scores.size
    w = _dense_weights(dist, idx, gamma)
    s = scores.astype(np.float64).copy()
    selected = np.zeros(n, dtype=bool)
    out = []
    for _ in range(n_select):
        if rng is None:
            cand = np.where(selected, -np.inf, s)
            i = int(np.argmax(cand))  # first max = lowest index
        else:
            p = np.where(selected, 0.0, np.maximum(s, 0.0))
            c = np.cumsum(p)
            i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
        cur = s[i]
        selected[i] = True
        out.append(i)
        if cur > 0:
            s -= w[i] * cur
    return np.sort(np.array(out))


@pytest.mark.parametrize("sampling", ["absolute", "weighted"])
def test_d2_select_matches_naive_reference(sampling):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(200, 4)).astype(np.float32)
    dist, idx = knn_chunked(emb, 5)
    gamma = default_gamma(dist)
    graph = neighbour_graph(dist, idx, gamma)
    scores = d2_forward(rng.uniform(0.2, 1.0, 200), graph)
    # dist is float32; the reference uses the same values so both see identical weights
    got = d2_select(scores, graph, 120, sampling=sampling,
                    rng=np.random.default_rng(11) if sampling == "weighted" else None)
    ref = _naive_select(scores, dist.astype(np.float64), idx, gamma, 120,
                        rng=np.random.default_rng(11) if sampling == "weighted" else None)
    assert got.dtype == np.int64 and got.size == 120
    np.testing.assert_array_equal(got, ref)


def _clustered(seed: int = 0):
    """5 sparse clusters of 40 points and one dense redundant cluster of 400 points, far apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 8)) * 20
    parts = [centres[c] + rng.normal(size=(40, 8)) * 0.3 for c in range(5)]
    parts.append(centres[5] + rng.normal(size=(400, 8)) * 0.02)
    labels = np.repeat(np.arange(6), [40] * 5 + [400])
    return np.concatenate(parts).astype(np.float32), labels, rng.uniform(0.5, 1.0, labels.size)


@pytest.mark.parametrize("mode", ["sum", "product"])
@pytest.mark.parametrize("sampling", ["absolute", "weighted"])
def test_d2_covers_clusters_and_thins_dense_one(mode, sampling):
    emb, labels, difficulty = _clustered()
    dist, idx = knn_chunked(emb, 10)
    graph = neighbour_graph(dist, idx, default_gamma(dist))
    scores = d2_forward(difficulty, graph, mode=mode)
    kept = d2_select(scores, graph, 300, sampling=sampling, rng=np.random.default_rng(0))
    per_cluster = np.bincount(labels[kept], minlength=6)
    assert kept.size == 300 and np.all(per_cluster > 0), per_cluster
    dense_share = 400 / 600
    assert per_cluster[5] / 300 < dense_share, per_cluster
    # Random selection would take ~2/3 from the dense cluster; D2 should be well below that.
    assert per_cluster[5] / 300 < 0.6, per_cluster


def test_d2_weighted_is_deterministic_from_rng():
    emb, _, difficulty = _clustered(1)
    dist, idx = knn_chunked(emb, 10)
    graph = neighbour_graph(dist, idx, default_gamma(dist))
    scores = d2_forward(difficulty, graph)
    a = d2_select(scores, graph, 200, "weighted", np.random.default_rng(5))
    b = d2_select(scores, graph, 200, "weighted", np.random.default_rng(5))
    c = d2_select(scores, graph, 200, "weighted", np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_d2_strategy_and_resume():
    emb, labels, difficulty = _clustered(2)
    n = labels.size
    rng = np.random.default_rng(4)
    # epoch noise large enough that no single epoch's losses select the same subset as their mean
    losses = difficulty[None, :] + rng.normal(0, 0.05, size=(3, n))

    def make():
        return D2Pruning(n, warmup_epochs=3, prune_ratio=0.5, neighbors=10, seed=1)

    s = make()
    run = _drive_static(s, range(5), lambda e: losses[e], lambda: emb)
    assert [r[2] for r in run] == [False, False, True, False, False]  # embeddings on the last warm-up epoch only
    assert [r[1] for r in run] == [True, True, True, False, False]
    assert s.subset is not None and s.subset.size == 300
    # the selection is D2 on the warm-up's mean loss (difficulty) and the embeddings, with gamma = 1 / median
    # k-NN distance
    ref_subset, ref_stats = d2_prune(losses.mean(axis=0), emb, 0.5, neighbors=10, seed=1)
    np.testing.assert_array_equal(s.subset, ref_subset)
    dist, _, _ = knn_graph(emb, 10)
    assert s.gamma_used == ref_stats["gamma"] == default_gamma(dist)
    for epoch_losses in losses:  # the guard: the mean is what tells these apart
        assert not np.array_equal(d2_prune(epoch_losses, emb, 0.5, neighbors=10, seed=1)[0], ref_subset)
    np.testing.assert_array_equal(run[3][0], s.subset)
    assert run[2][3]["d2_selected"] == 300
    assert np.bincount(labels[s.subset], minlength=6)[5] < 200
    for split in (1, 3):
        first = make()
        part = _drive_static(first, range(split), lambda e: losses[e], lambda: emb)
        resumed = make()
        resumed.load_state_dict(roundtrip(first.state_dict()))
        part += _drive_static(resumed, range(split, 5), lambda e: losses[e], lambda: emb)
        for a, b in zip(run, part):
            np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="embeddings"):
        _drive_static(make(), range(3), lambda e: losses[e], lambda: None)


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def test_cli_dynunc_subprocess(tmp_path):
    h, volatile = _volatile_history(n=500, n_volatile=100, epochs=5)
    np.save(tmp_path / "L.npy", h)
    out = tmp_path / "kept.npy"
    proc = subprocess.run(
        [sys.executable, "-m", "d3p.static", "dynunc", "--losses", str(tmp_path / "L.npy"), "--ratio", "0.8",
         "--out", str(out), "--window", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["method"] == "dynunc" and info["N"] == 500 and info["kept"] == 100
    kept = np.load(out)
    assert kept.dtype == np.int64
    np.testing.assert_array_equal(kept, volatile)


def test_cli_d2(tmp_path, capsys):
    emb, labels, difficulty = _clustered(3)
    np.save(tmp_path / "E.npy", emb)
    np.save(tmp_path / "L1.npy", difficulty)
    np.save(tmp_path / "L2.npy", np.stack([difficulty, difficulty]))
    for losses in ("L1.npy", "L2.npy"):
        out = tmp_path / f"kept_{losses}"
        assert main(["d2", "--losses", str(tmp_path / losses), "--embeddings", str(tmp_path / "E.npy"),
                     "--ratio", "0.5", "--out", str(out), "--neighbors", "10"]) == 0
        info = json.loads(capsys.readouterr().out.strip())
        assert info["method"] == "d2" and info["kept"] == 300 and info["prune_ratio"] == 0.5
        assert np.load(out).size == 300
    np.testing.assert_array_equal(np.load(tmp_path / "kept_L1.npy"), np.load(tmp_path / "kept_L2.npy"))
    for knn in ("torch", "faiss"):
        assert main(["d2", "--losses", str(tmp_path / "L1.npy"), "--embeddings", str(tmp_path / "E.npy"),
                     "--ratio", "0.5", "--out", str(tmp_path / f"kept_{knn}.npy"), "--knn", knn]) == 0
        assert json.loads(capsys.readouterr().out.strip())["knn_backend"] == knn


@pytest.mark.parametrize(
    "args, message",
    [
        (["dynunc", "--losses", "{d}/L.npy", "--ratio", "0.5", "--out", "{d}/k.npy", "--window", "9"], "--window"),
        (["dynunc", "--losses", "{d}/missing.npy", "--ratio", "0.5", "--out", "{d}/k.npy"], "does not exist"),
        (["dynunc", "--losses", "{d}/L.npy", "--ratio", "1.5", "--out", "{d}/k.npy"], "--ratio"),
        (["dynunc", "--losses", "{d}/bad.npy", "--ratio", "0.5", "--out", "{d}/k.npy"], "cannot read"),
        (["dynunc", "--losses", "{d}/L.npy", "--ratio", "0.5", "--out", "{d}/k.txt"], "--out"),
        (["d2", "--losses", "{d}/L.npy", "--ratio", "0.5", "--out", "{d}/k.npy"], "--embeddings"),
        (["d2", "--losses", "{d}/L.npy", "--embeddings", "{d}/E_bad.npy", "--ratio", "0.5", "--out", "{d}/k.npy"],
         "shape"),
        (["d2", "--losses", "{d}/L.npy", "--embeddings", "{d}/E.npy", "--ratio", "0.5", "--out", "{d}/k.npy",
          "--neighbors", "40"], "--neighbors"),
        (["d2", "--losses", "{d}/L.npy", "--embeddings", "{d}/E.npy", "--ratio", "0.5", "--out", "{d}/k.npy",
          "--mode", "max"], "invalid choice"),
        (["d2", "--losses", "{d}/L.npy", "--embeddings", "{d}/E.npy", "--ratio", "0.5", "--out", "{d}/k.npy",
          "--knn", "torch", "--knn_index", "ivf"], "exact only"),
        (["d2", "--losses", "{d}/L.npy", "--embeddings", "{d}/E.npy", "--ratio", "0.5", "--out", "{d}/k.npy",
          "--nprobe", "0"], "--nprobe"),
    ],
)
def test_cli_rejects_bad_input(tmp_path, capsys, args, message):
    np.save(tmp_path / "L.npy", np.random.default_rng(0).uniform(size=(4, 40)))
    np.save(tmp_path / "E.npy", np.random.default_rng(0).normal(size=(40, 3)))
    np.save(tmp_path / "E_bad.npy", np.zeros((39, 3)))
    (tmp_path / "bad.npy").write_text("not a numpy file")
    with pytest.raises(SystemExit) as exc:
        main([a.format(d=tmp_path) for a in args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "k.npy").exists()
