"""`SeTa` ('seta'): Zhou et al., CVPR 2025 -- random subset, 1-D k-means on loss, sliding window."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from d3p.methods.common import (
    DELTA, PRUNE_RATIO, LossScoredStrategy, anneal_start, check_ratio, kept_size, uniform_subset, update_scores,
)
from d3p.registry import Option, register_method
from d3p.strategy import EpochLosses, EpochPlan, epoch_rng


_PURPOSE_SETA_SUBSET = 21
_PURPOSE_SETA_ANNEAL = 22
# The published SeTa (and InfoBatch) code starts every sample's score at 3.0; SeTa groups never-trained samples by it.
SETA_INITIAL_SCORE = 3.0


def kmeans_1d(values: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (globally optimal) 1-D k-means: the partition into G groups of least within-group sum of squares.

    values: float [M]. Returns (labels int64 [M] in 0..G'-1, centres float64 [G'] strictly increasing), where
    G' = min(groups, number of distinct values). Labels are ordered by centre, so group 0 is the easiest (lowest
    loss). Equal values always share a group; with <= G distinct values every distinct value is its own group.

    Why exact: Lloyd's iterations (what we used before; scikit-learn restarts them) stop in local optima, and on
    heavy-tailed losses those are 20-60% worse than the optimum. In 1-D an optimal cluster is an interval of the
    sorted values, so the optimum is a dynamic programme over the U sorted distinct values (weighted by their
    counts): cost[g][j] = min_i cost[g-1][i] + sse(i, j), where sse(i, j) of values i..j-1 comes from float64
    prefix sums of the count, the sum and the sum of squares of the *centred* values (centring keeps the
    sum-of-squares differences accurate). The best split i is non-decreasing in j (the sse is a Monge array), so
    each layer is solved by divide and conquer, vectorised one recursion level at a time: O(G U log U) work in
    O(G log U) numpy passes (about a second for U = 640,000, G = 10). Ties between equally good splits go to the
    smallest i, so the result is deterministic.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"kmeans_1d needs a non-empty 1-D array, got shape {x.shape}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if not np.all(np.isfinite(x)):
        raise ValueError("kmeans_1d got non-finite values")
    distinct, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    u = distinct.size
    if u <= groups:
        return inverse.astype(np.int64), distinct.astype(np.float64)
    cuts = _optimal_cuts_1d(distinct, counts.astype(np.float64), groups)  # int64 [G+1], 0 = cuts[0] < ... = U
    group_of_distinct = np.repeat(np.arange(groups, dtype=np.int64), np.diff(cuts))
    weight_sum = np.add.reduceat(counts.astype(np.float64), cuts[:-1])
    centres = np.add.reduceat(distinct * counts, cuts[:-1]) / weight_sum
    return group_of_distinct[inverse], centres


def _optimal_cuts_1d(xs: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """Optimal G-way cut of sorted distinct values xs [U] with weights w [U]: int64 [G+1] boundaries (see kmeans_1d).

    Requires U > G. Row g of the table is the cost of splitting the first j values into g+1 groups.
    """
    u = xs.size
    centred = xs - np.average(xs, weights=w)
    c0 = np.concatenate([[0.0], np.cumsum(w)])
    c1 = np.concatenate([[0.0], np.cumsum(w * centred)])
    c2 = np.concatenate([[0.0], np.cumsum(w * centred * centred)])

    def sse(i: np.ndarray, j: np.ndarray) -> np.ndarray:  # weighted SSE of values i..j-1 (i < j), >= 0
        s1 = c1[j] - c1[i]
        return np.maximum((c2[j] - c2[i]) - s1 * s1 / (c0[j] - c0[i]), 0.0)

    js = np.arange(u + 1)
    cost = np.full(u + 1, np.inf)
    cost[1:] = sse(np.zeros(u, dtype=np.int64), js[1:])  # one group
    argmins = np.zeros((groups, u + 1), dtype=np.int64)
    for g in range(1, groups):
        new = np.full(u + 1, np.inf)
        arg = np.zeros(u + 1, dtype=np.int64)
        # Pending divide-and-conquer nodes: j in [jlo, jhi], best split searched in [ilo, ihi]. The first j with a
        # (g+1)-group split is g+1; the last split for j = U leaves at least one value per group: i <= U - 1.
        jlo, jhi = np.array([g + 1]), np.array([u])
        ilo, ihi = np.array([g]), np.array([u - 1])
        while jlo.size:
            mid = (jlo + jhi) // 2
            top = np.minimum(ihi, mid - 1)
            lengths = top - ilo + 1  # >= 1: ilo <= opt(jlo) <= mid - 1 by monotonicity
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            node = np.repeat(np.arange(mid.size), lengths)
            i = ilo[node] + (np.arange(node.size) - starts[node])
            val = cost[i] + sse(i, mid[node])
            best = np.minimum.reduceat(val, starts)
            hit = np.flatnonzero(val == best[node])
            first = hit[np.searchsorted(node[hit], np.arange(mid.size))]  # leftmost minimiser per node
            opt = i[first]
            new[mid], arg[mid] = best, opt
            left = jlo <= mid - 1
            right = mid + 1 <= jhi
            jlo, jhi, ilo, ihi = (
                np.concatenate([jlo[left], (mid + 1)[right]]),
                np.concatenate([(mid - 1)[left], jhi[right]]),
                np.concatenate([ilo[left], opt[right]]),
                np.concatenate([opt[left], ihi[right]]),
            )
        cost, argmins[g] = new, arg
    cuts = np.empty(groups + 1, dtype=np.int64)
    cuts[groups] = u
    for g in range(groups - 1, 0, -1):
        cuts[g] = argmins[g][cuts[g + 1]]
    cuts[0] = 0
    return cuts


def seta_window(num_groups: int, window_scale: float, t: int) -> tuple[int, int]:
    """(start, width) of SeTa's sliding window over num_groups groups for the t-th pruned epoch.

    width = max(1, round(G * window_scale)); start = t % (G - width + 1), so the window slides easy-to-hard
    0, 1, ..., G - width and wraps. t = 0 (no scores yet) keeps every group: returns (0, G).
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if t == 0:
        return 0, num_groups
    width = int(min(max(round(num_groups * window_scale), 1), num_groups))
    return t % (num_groups - width + 1), width


class SeTa(LossScoredStrategy):
    """SeTa (Zhou et al., CVPR 2025), spec section 10.

    Epoch e < floor(delta*E) (the t-th pruned epoch, t = e): a uniform random subset of round((1-r)*N) samples is
    split by score with 1-D k-means into G groups ordered by centre; the kept samples are the subset members of the
    window of round(G*window_scale) consecutive groups starting at t % (G - window + 1) (t = 0: all groups).
    Epoch e >= floor(delta*E): a uniform random subset of round((1-r)*N). No rescaling (weights None).

    Scores are the latest training loss, updated like InfoBatch. Only part of the data is trained per epoch, so in
    the first pruned epochs some samples have no score yet; they get `initial_score`, by default the published
    code's initial score 3.0 (`SETA_INITIAL_SCORE`), exactly as there: equal values always share one k-means group,
    so the unscored samples form one group of their own, which the window keeps only when it covers that group.
    With MAE losses (~0.1-1.5) 3.0 is above every trained score, so they are the hardest group: in the first pruned
    epoch (window groups 1..5 of 10) they are all dropped and the subset keeps ~40% of the random half, as the
    published code does (the mean score we gave them before put them in one oversized middle group that was always
    kept: 84%). Their number shrinks every epoch. If the k-means finds fewer than G non-empty groups (few distinct
    scores), the window is computed on the groups found.
    """

    name = "seta"
    hyperparameters = ("num_epochs", "prune_ratio", "groups", "window_scale", "delta", "seed", "initial_score")

    def __init__(
        self,
        num_samples: int,
        num_epochs: int,
        prune_ratio: float = 0.5,
        groups: int = 10,
        window_scale: float = 0.5,
        delta: float = 0.875,
        seed: int = 0,
        initial_score: float = SETA_INITIAL_SCORE,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not math.isfinite(initial_score):
            raise ValueError(f"initial_score must be finite, got {initial_score}")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        if not 0.0 < window_scale <= 1.0:
            raise ValueError(f"window_scale must be in (0, 1], got {window_scale}")
        check_ratio(prune_ratio)
        self.num_samples = int(num_samples)
        self.num_epochs = int(num_epochs)
        self.prune_ratio = float(prune_ratio)
        self.groups = int(groups)
        self.window_scale = float(window_scale)
        self.delta = float(delta)
        self.seed = int(seed)
        self.initial_score = float(initial_score)
        self.anneal_epoch = anneal_start(self.num_epochs, self.delta)
        self.subset_size = kept_size(self.num_samples, self.prune_ratio)
        self.scores = np.full(self.num_samples, np.nan, dtype=np.float64)  # NaN: never trained yet
        self._last: tuple[int, dict[str, Any]] | None = None

    def epoch_subset(self, epoch: int) -> np.ndarray:
        """int64 [round((1-r)*N)] sorted: the uniform random subset drawn for this epoch (before grouping)."""
        purpose = _PURPOSE_SETA_ANNEAL if epoch >= self.anneal_epoch else _PURPOSE_SETA_SUBSET
        return uniform_subset(self.num_samples, self.subset_size, epoch_rng(self.seed, epoch, purpose))

    def plan_with_stats(self, epoch: int) -> tuple[EpochPlan, dict[str, Any]]:
        if epoch >= self.anneal_epoch:
            kept = self.epoch_subset(epoch)
            return EpochPlan(kept=kept, record_losses=False), {"annealing": True, "kept": int(kept.size)}
        subset = self.epoch_subset(epoch)
        sub_scores = self.scores[subset]
        known = np.isfinite(sub_scores)
        stats: dict[str, Any] = {"annealing": False, "unscored": int((~known).sum())}
        if epoch == 0 or not known.any():
            kept = subset  # t = 0 keeps every group; without any score there is nothing to group by either
            stats.update(groups=1, window_start=0, window=1)
        else:
            sub_scores = np.where(known, sub_scores, self.initial_score)
            labels, centres = kmeans_1d(sub_scores, self.groups)
            start, width = seta_window(centres.size, self.window_scale, epoch)
            kept = subset[(labels >= start) & (labels < start + width)]
            stats.update(groups=int(centres.size), window_start=start, window=width)
        stats["kept"] = int(kept.size)
        return EpochPlan(kept=kept, record_losses=True), stats

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        stats = self.stats_of(epoch)
        update_scores(self.scores, losses)
        n = self.num_samples
        log: dict[str, Any] = {
            "kept": stats["kept"],
            "epoch_prune_ratio": 1.0 - stats["kept"] / n,
            "seta_realised_ratio": 1.0 - stats["kept"] / n,
            "seta_annealing": stats["annealing"],
        }
        if not stats["annealing"]:
            log.update(
                seta_groups=stats["groups"],
                seta_window_start=stats["window_start"],
                seta_window=stats["window"],
                seta_unscored_in_subset=stats["unscored"],
            )
        return log


SETA_OPTIONS = (PRUNE_RATIO, DELTA, Option("seta_groups", 10, int), Option("seta_window_scale", 0.5, float))


@register_method("seta", "dynamic", SETA_OPTIONS, needs_epochs=True,
                 help="SeTa: random subset, 1-D k-means on the loss, sliding window")
def build_seta(num_samples: int, epochs: int, seed: int, prune_ratio: float, delta: float, seta_groups: int,
               seta_window_scale: float) -> SeTa:
    return SeTa(num_samples, epochs, prune_ratio, seta_groups, seta_window_scale, delta, seed=seed)
