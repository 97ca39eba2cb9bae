"""Dynamic pruning baselines of spec section 10 as `PruningStrategy` classes.

- `NoPruning`     ('none'):      the whole dataset every epoch.
- `InfoBatch`     ('infobatch'): Qin et al., ICLR 2024 -- prune below-mean-loss samples at random, rescale the rest.
- `SeTa`          ('seta'):      Zhou et al., CVPR 2025 -- random subset, 1-D k-means on loss, sliding window.
- `RandomDynamic` ('random'):    a fresh uniform random subset per epoch, optionally matched to a recorded run.

All randomness comes from `epoch_rng(seed, epoch, purpose)`, so every rank computes the same plan and a resumed run
computes the same plans as an uninterrupted one without storing generator state. Epochs are 0-based.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d3p.strategy import EpochLosses, EpochPlan, epoch_rng

# Distinct `purpose` values for epoch_rng, so two random decisions of one epoch never share a stream.
_PURPOSE_INFOBATCH = 11
_PURPOSE_SETA_SUBSET = 21
_PURPOSE_SETA_ANNEAL = 22
_PURPOSE_RANDOM = 31

# The published SeTa (and InfoBatch) code starts every sample's score at 3.0; SeTa groups never-trained samples by it.
SETA_INITIAL_SCORE = 3.0


# ----------------------------------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------------------------------
def kept_size(num_samples: int, prune_ratio: float) -> int:
    """Number of samples kept at prune ratio r: round((1 - r) * N), clipped to [1, N].

    Python's round (half to even) as written in the spec; clipped so that an epoch never trains on nothing.
    """
    _check_ratio(prune_ratio)
    return int(min(max(round((1.0 - prune_ratio) * num_samples), 1), num_samples))


def anneal_start(num_epochs: int, delta: float) -> int:
    """First (0-based) epoch index of the full-data annealing phase: floor(delta * E).

    The published InfoBatch and SeTa samplers count their calls from 1 (SeTa's starts at 1; InfoBatch's is called
    once in its constructor), so 0-based epoch e is call e + 1 and it prunes while e + 1 <= delta * E: the last
    pruned epoch is floor(delta * E) - 1 and full data starts at floor(delta * E) (E = 10, delta = 0.875: epochs
    0..7 pruned, 8 and 9 full; E = 20: 0..16 pruned). Their float equality `e + 1 == delta * E + 1` only decides
    whether the weights are reset; ours are reset at every plan, so it does not matter here.
    Computed on the exact decimal value of delta (Fraction of its shortest repr), because float products such as
    0.7 * 10 = 7.000000000000001 are not what the user meant; epochs are compared as integers.
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    return int(math.floor(Fraction(repr(float(delta))) * num_epochs))


def sorted_unique_int64(indices: np.ndarray) -> np.ndarray:
    """int64 [K] sorted copy of an index array (the `EpochPlan.kept` contract)."""
    return np.sort(np.asarray(indices, dtype=np.int64))


def uniform_subset(num_samples: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [size] sorted uniform random subset of range(num_samples), without replacement."""
    return sorted_unique_int64(rng.choice(num_samples, size=size, replace=False))


def update_scores(scores: np.ndarray, losses: EpochLosses | None) -> int:
    """In place: scores[i] <- the epoch's mean loss of i for every sample seen this epoch; returns how many.

    scores: float64 [N]. Samples not trained this epoch keep their previous score (InfoBatch's rule).
    """
    if losses is None:
        return 0
    seen = np.asarray(losses.seen)
    if seen.shape != scores.shape:
        raise ValueError(f"losses cover {seen.shape[0]} samples, the strategy has {scores.shape[0]}")
    scores[seen] = losses.mean[seen]
    return int(seen.sum())


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


def _check_ratio(prune_ratio: float) -> None:
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")


def _full_plan(num_samples: int, record_losses: bool, normalize_weights: bool = True) -> EpochPlan:
    return EpochPlan(
        kept=np.arange(num_samples, dtype=np.int64),
        weights=None,
        record_losses=record_losses,
        normalize_weights=normalize_weights,
    )


class _Base:
    """Shared bookkeeping: the name/num_samples check of load_state_dict."""

    name: str = ""
    num_samples: int

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for strategy {state.get('name')!r}, this is {self.name!r}")
        if int(state.get("num_samples", -1)) != self.num_samples:
            raise ValueError(
                f"state_dict has num_samples={state.get('num_samples')}, this strategy has {self.num_samples}"
            )


class _LossScored(_Base):
    """Methods scored by each sample's latest training loss (InfoBatch, SeTa): the scores are their whole state."""

    scores: np.ndarray
    _hyper: tuple[str, ...] = ()
    _last: tuple[int, dict[str, Any]] | None = None  # (epoch, statistics of its plan)

    def _plan_with_stats(self, epoch: int) -> tuple[EpochPlan, dict[str, Any]]:
        raise NotImplementedError

    def plan_epoch(self, epoch: int) -> EpochPlan:
        plan, stats = self._plan_with_stats(epoch)
        self._last = (epoch, stats)
        return plan

    def _stats_of(self, epoch: int) -> dict[str, Any]:
        """The statistics of `epoch`'s plan; recomputed after a resume (the plan is a pure function of
        the scores before this epoch's update, the seed and the epoch)."""
        if self._last is None or self._last[0] != epoch:
            self._last = (epoch, self._plan_with_stats(epoch)[1])
        return self._last[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            **{k: getattr(self, k) for k in self._hyper},
            "scores": torch.from_numpy(self.scores.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the scores; hyper-parameters stay those given to the constructor (the current flags)."""
        self._check_state(state)
        self.scores = state["scores"].numpy().astype(np.float64, copy=True)
        self._last = None


# ----------------------------------------------------------------------------------------------------------------
# Whole dataset
# ----------------------------------------------------------------------------------------------------------------
class NoPruning(_Base):
    """Full data every epoch, no loss recording (the 'Whole dataset' row)."""

    name = "none"

    def __init__(self, num_samples: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)

    def plan_epoch(self, epoch: int) -> EpochPlan:
        return _full_plan(self.num_samples, record_losses=False)

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        return {"kept": self.num_samples, "epoch_prune_ratio": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)


# ----------------------------------------------------------------------------------------------------------------
# InfoBatch
# ----------------------------------------------------------------------------------------------------------------
class InfoBatch(_LossScored):
    """InfoBatch (Qin et al., ICLR 2024), epoch-level version of spec section 10.

    score[i] = latest training loss of i (float64 [N]); all equal at the start, so epoch 0 keeps everything.
    Epoch e < floor(delta*E): every sample with score strictly below the mean score is pruned independently with
    probability r; kept below-mean samples get weight 1/(1-r), all others 1; batch loss = mean(w*l)
    (normalize_weights=False). Epoch e >= floor(delta*E): full data, weights 1. Losses are recorded every epoch and
    the scores of the samples trained in it are replaced by their loss. Realised ratio = r * (fraction below mean) < r.
    """

    name = "infobatch"
    _hyper = ("num_epochs", "prune_ratio", "delta", "seed")

    def __init__(
        self, num_samples: int, num_epochs: int, prune_ratio: float = 0.5, delta: float = 0.875, seed: int = 0
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        _check_ratio(prune_ratio)
        self.num_samples = int(num_samples)
        self.num_epochs = int(num_epochs)
        self.prune_ratio = float(prune_ratio)
        self.delta = float(delta)
        self.seed = int(seed)
        self.anneal_epoch = anneal_start(self.num_epochs, self.delta)
        # Equal initial scores (the published code uses 3.0; only equality matters): nothing is below the mean.
        self.scores = np.ones(self.num_samples, dtype=np.float64)
        self._last: tuple[int, dict[str, Any]] | None = None  # (epoch, stats of its plan), recomputable

    def _plan_with_stats(self, epoch: int) -> tuple[EpochPlan, dict[str, Any]]:
        n = self.num_samples
        if epoch >= self.anneal_epoch:
            return _full_plan(n, record_losses=True, normalize_weights=False), {
                "below_mean": 0, "pruned": 0, "annealing": True}
        below = self.scores < self.scores.mean()
        rng = epoch_rng(self.seed, epoch, _PURPOSE_INFOBATCH)
        # One uniform draw per sample (not per below-mean sample) so the draw of sample i does not depend on which
        # other samples are below the mean.
        pruned = below & (rng.random(n) < self.prune_ratio)
        weights = np.ones(n, dtype=np.float32)
        weights[below & ~pruned] = np.float32(1.0 / (1.0 - self.prune_ratio))
        plan = EpochPlan(
            kept=np.flatnonzero(~pruned).astype(np.int64),
            weights=weights,
            record_losses=True,
            normalize_weights=False,
        )
        return plan, {"below_mean": int(below.sum()), "pruned": int(pruned.sum()), "annealing": False}

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        stats = self._stats_of(epoch)
        updated = update_scores(self.scores, losses)
        n = self.num_samples
        return {
            "kept": n - stats["pruned"],
            "epoch_prune_ratio": stats["pruned"] / n,
            "infobatch_realised_ratio": stats["pruned"] / n,
            "infobatch_below_mean_fraction": stats["below_mean"] / n,
            "infobatch_annealing": stats["annealing"],
            "infobatch_scores_updated": updated,
        }



# ----------------------------------------------------------------------------------------------------------------
# SeTa
# ----------------------------------------------------------------------------------------------------------------
class SeTa(_LossScored):
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
    _hyper = ("num_epochs", "prune_ratio", "groups", "window_scale", "delta", "seed", "initial_score")

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
        _check_ratio(prune_ratio)
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

    def _plan_with_stats(self, epoch: int) -> tuple[EpochPlan, dict[str, Any]]:
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
        stats = self._stats_of(epoch)
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



# ----------------------------------------------------------------------------------------------------------------
# Random dynamic
# ----------------------------------------------------------------------------------------------------------------
class RandomDynamic(_Base):
    """A fresh uniform random subset each epoch (no weights, no recording).

    Size round((1-r)*N), or exactly kept_counts[epoch] when kept_counts is given (the fair control matched epoch by
    epoch to a recorded D3P run; see `read_kept_counts`).
    """

    name = "random"

    def __init__(
        self, num_samples: int, prune_ratio: float = 0.5, seed: int = 0, kept_counts: list[int] | None = None
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        _check_ratio(prune_ratio)
        self.num_samples = int(num_samples)
        self.prune_ratio = float(prune_ratio)
        self.seed = int(seed)
        self.kept_counts: list[int] | None = None
        if kept_counts is not None:
            counts = [int(c) for c in kept_counts]
            bad = [(e, c) for e, c in enumerate(counts) if not 1 <= c <= self.num_samples]
            if bad:
                raise ValueError(f"kept_counts must lie in [1, {self.num_samples}]; bad (epoch, count): {bad[:5]}")
            self.kept_counts = counts

    def epoch_size(self, epoch: int) -> int:
        """Number of samples kept in this epoch."""
        if self.kept_counts is None:
            return kept_size(self.num_samples, self.prune_ratio)
        if not 0 <= epoch < len(self.kept_counts):
            raise ValueError(
                f"epoch {epoch} has no recorded kept count: the matched run covers epochs "
                f"0..{len(self.kept_counts) - 1}"
            )
        return self.kept_counts[epoch]

    def plan_epoch(self, epoch: int) -> EpochPlan:
        kept = uniform_subset(self.num_samples, self.epoch_size(epoch), epoch_rng(self.seed, epoch, _PURPOSE_RANDOM))
        return EpochPlan(kept=kept, record_losses=False)

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        k = self.epoch_size(epoch)
        return {"kept": k, "epoch_prune_ratio": 1.0 - k / self.num_samples,
                "random_matched": self.kept_counts is not None}

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "prune_ratio": self.prune_ratio,
            "seed": self.seed,
            "kept_counts": None if self.kept_counts is None else list(self.kept_counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless apart from its config; checks that a matched run resumes with the same kept counts."""
        self._check_state(state)
        saved = state.get("kept_counts")
        if saved is not None and self.kept_counts is not None and list(saved) != self.kept_counts:
            raise ValueError("state_dict was saved with different kept_counts than this strategy was given")


def read_kept_counts(run_dir: str | Path) -> list[int]:
    """Kept counts of a recorded run, indexed by 0-based epoch, from RUN_DIR/log.txt.

    log.txt holds one JSON object per line with integer fields `epoch` (0-based) and `kept`. Blank lines are
    skipped; when an epoch appears twice (a resumed run re-logged it) the last line wins. Raises ValueError naming
    the file and the offending line, field or missing epochs; FileNotFoundError if the file does not exist.
    """
    path = Path(run_dir) / "log.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the log.txt of a recorded D3P run)")
    counts: dict[int, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        values = {}
        for field_name in ("epoch", "kept"):
            if field_name not in row:
                raise ValueError(f"{path}:{lineno}: missing field {field_name!r} (fields: {sorted(row)})")
            value = row[field_name]
            if isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            ):
                raise ValueError(f"{path}:{lineno}: field {field_name!r} must be an integer, got {value!r}")
            values[field_name] = int(value)
        if values["epoch"] < 0 or values["kept"] < 0:
            raise ValueError(f"{path}:{lineno}: negative epoch or kept count: {values}")
        counts[values["epoch"]] = values["kept"]
    if not counts:
        raise ValueError(f"{path}: no epoch lines")
    last = max(counts)
    missing = [e for e in range(last + 1) if e not in counts]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"{path}: epochs {shown} are missing (found epochs up to {last})")
    return [counts[e] for e in range(last + 1)]
