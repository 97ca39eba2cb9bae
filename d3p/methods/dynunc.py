"""Dyn-Unc (He et al., "Large-scale Dataset Pruning with Dynamic Uncertainty"), adapted to MAE: per-sample
loss recorded for J full-data epochs; score = mean over sliding windows (width w, over epochs) of the
loss's std inside the window; keep the top (1-r) fraction."""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from d3p.methods.common import PRUNE_RATIO, kept_size
from d3p.methods.static_base import STATIC_WARMUP, StaticSelector, check_warmup
from d3p.registry import Option, register_method


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


class DynUnc(StaticSelector):
    """Dyn-Unc as a static selector: epochs 0..J-1 full data with losses recorded; at the end of epoch J-1 keep
    the round((1-r)*N) samples of highest dynamic uncertainty (window w over the J epochs) for all later epochs."""

    name = "dynunc"

    def __init__(self, num_samples: int, warmup_epochs: int, prune_ratio: float, window: int, seed: int = 0) -> None:
        super().__init__(num_samples, warmup_epochs, prune_ratio, seed)
        if not 2 <= window <= warmup_epochs:
            raise ValueError(f"window must be in [2, warmup_epochs={warmup_epochs}], got {window}")
        self.window = int(window)

    def select(self, history: np.ndarray, embeddings: np.ndarray | None) -> dict[str, Any]:
        scores = dynunc_scores(history, self.window)
        self.subset = top_k_indices(scores, self.n_keep)
        return {"score_mean": float(scores.mean()), "score_kept_min": float(scores[self.subset].min())}


@register_method("dynunc", "static", (PRUNE_RATIO, STATIC_WARMUP, Option("dynunc_window", 3, int)),
                 check=check_warmup, help="Dyn-Unc: keep the samples of highest loss volatility (static)")
def build_dynunc(num_samples: int, seed: int, prune_ratio: float, static_warmup_epochs: int,
                 dynunc_window: int) -> DynUnc:
    return DynUnc(num_samples, static_warmup_epochs, prune_ratio, dynunc_window, seed=seed)
