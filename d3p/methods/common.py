"""What a method author builds on (public: `d3p.BaseStrategy`, `d3p.LossScoredStrategy`), the bookkeeping shared by
the dynamic baselines (none, infobatch, seta, random; spec section 10): kept sizes, the annealing start, uniform
subsets, the loss scores of InfoBatch/SeTa and the state checks; and the options several methods share
(`PRUNE_RATIO`, `DELTA`: one Option object each, so their flags are defined once).

All randomness comes from `epoch_rng(seed, epoch, purpose)`, so every rank computes the same plan and a
resumed run computes the same plans as an uninterrupted one without storing generator state. Epochs are
0-based.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from d3p.registry import Option
from d3p.strategy import EpochLosses, EpochPlan

PRUNE_RATIO = Option("prune_ratio", 0.5, float, "r of InfoBatch/SeTa/random/static methods",
                     valid=lambda r: 0.0 <= r < 1.0, rule="must lie in [0, 1)")
DELTA = Option("delta", 0.875, float, "InfoBatch/SeTa: full data from 0-based epoch floor(delta*epochs)",
               valid=lambda d: 0.0 < d <= 1.0, rule="must lie in (0, 1]")


def kept_size(num_samples: int, prune_ratio: float) -> int:
    """Number of samples kept at prune ratio r: round((1 - r) * N), clipped to [1, N].

    Python's round (half to even) as written in the spec; clipped so that an epoch never trains on nothing.
    """
    check_ratio(prune_ratio)
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


def check_ratio(prune_ratio: float) -> None:
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")


def full_plan(num_samples: int, record_losses: bool, normalize_weights: bool = True) -> EpochPlan:
    return EpochPlan(
        kept=np.arange(num_samples, dtype=np.int64),
        weights=None,
        record_losses=record_losses,
        normalize_weights=normalize_weights,
    )


class BaseStrategy:
    """The base of a method: `name` (the registered name), `num_samples`, and `check_state`, the name/num_samples
    check a `load_state_dict` starts with. A subclass implements `d3p.PruningStrategy`'s plan_epoch, end_epoch,
    state_dict (plain data, with "name" and "num_samples") and load_state_dict."""

    name: str = ""
    num_samples: int

    def check_state(self, state: dict[str, Any]) -> None:
        """ValueError unless `state` was saved by a strategy of this name and dataset size."""
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for strategy {state.get('name')!r}, this is {self.name!r}")
        if int(state.get("num_samples", -1)) != self.num_samples:
            raise ValueError(
                f"state_dict has num_samples={state.get('num_samples')}, this strategy has {self.num_samples}"
            )


class LossScoredStrategy(BaseStrategy):
    """Methods scored by each sample's latest training loss (InfoBatch, SeTa): the scores are their whole state.

    A subclass sets `scores` (float64 [N]) and `hyperparameters` (attribute names saved with the state), implements
    `plan_with_stats(epoch) -> (plan, statistics)` as a pure function of the scores, seed and epoch, and in
    end_epoch updates the scores (`update_scores`) and logs `stats_of(epoch)`.
    """

    scores: np.ndarray
    hyperparameters: tuple[str, ...] = ()
    _last: tuple[int, dict[str, Any]] | None = None  # (epoch, statistics of its plan)

    def plan_with_stats(self, epoch: int) -> tuple[EpochPlan, dict[str, Any]]:
        raise NotImplementedError

    def plan_epoch(self, epoch: int) -> EpochPlan:
        plan, stats = self.plan_with_stats(epoch)
        self._last = (epoch, stats)
        return plan

    def stats_of(self, epoch: int) -> dict[str, Any]:
        """The statistics of `epoch`'s plan; recomputed after a resume (the plan is a pure function of
        the scores before this epoch's update, the seed and the epoch)."""
        if self._last is None or self._last[0] != epoch:
            self._last = (epoch, self.plan_with_stats(epoch)[1])
        return self._last[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            **{k: getattr(self, k) for k in self.hyperparameters},
            "scores": torch.from_numpy(self.scores.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the scores; hyper-parameters stay those given to the constructor (the current flags)."""
        self.check_state(state)
        self.scores = state["scores"].numpy().astype(np.float64, copy=True)
        self._last = None
