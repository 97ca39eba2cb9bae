"""The interface every pruning method implements, and the plan it hands the engine each epoch.

Epochs are counted from 0 in code (as MAE's loop does); the spec counts from 1, and
`d3p.schedule` does the translation in one place.

Per epoch the integration layer (`d3p.integration`) does:
    plan = strategy.plan_epoch(epoch)          # identical on every rank
    sampler.set_indices(plan.kept); sampler.set_epoch(epoch)
    ... train on plan.kept with plan.weights; if plan.record_losses, record (index, loss) ...
    ... forward-only pass over plan.forward_only (no grad), recording losses too ...
    losses = EpochLosses(...)                   # reduced across ranks once per epoch
    log = strategy.end_epoch(epoch, losses)     # the decision for the next epochs is made here
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class EpochPlan:
    """What to train on in one epoch.

    kept:          int64 [K] sorted dataset indices trained with gradient.
    weights:       float32 [N] per-sample loss weights, or None for all ones.
    forward_only:  int64 [M] indices that get an extra no-grad forward pass at the end of the
                   epoch so that every sample has a loss (D3P recording epochs); usually empty.
    record_losses: the engine must record the per-sample losses of this epoch.
    normalize_weights: True: batch loss = sum(w*l)/sum(w) (D3P, spec section 7);
                   False: batch loss = mean(w*l) (InfoBatch's rescaling).
    compute_embeddings: at the end of the epoch the engine runs the encoder unmasked over every
                   sample and passes mean-pooled features [N, D] to end_epoch (D2 Pruning).
    """

    kept: np.ndarray
    weights: np.ndarray | None = None
    forward_only: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    record_losses: bool = False
    normalize_weights: bool = True
    compute_embeddings: bool = False


@dataclass
class EpochLosses:
    """Per-sample losses of one epoch, already reduced across ranks.

    loss_sum: float64 [N] sum of the losses recorded for each sample this epoch.
    count:    int32 [N] how many times each sample was seen (0: not seen; 2: distributed padding).
    """

    loss_sum: np.ndarray
    count: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """float64 [N] mean loss per sample; NaN where the sample was not seen."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.loss_sum / np.maximum(self.count, 1), np.nan)

    @property
    def seen(self) -> np.ndarray:
        return self.count > 0


class PruningStrategy(Protocol):
    """A pruning method. Implementations must be deterministic given their seed and the losses,
    so that every rank computes the same plan (spec section 8)."""

    name: str
    num_samples: int

    def plan_epoch(self, epoch: int) -> EpochPlan: ...

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Receive the epoch's reduced losses (None when plan.record_losses was False), and the
        embeddings when plan.compute_embeddings was True, and return scalars to log (decision
        statistics when a decision was made)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Plain data only (tensors, numbers, strings, lists, dicts): loads with weights_only=True."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def epoch_rng(seed: int, epoch: int, purpose: int = 0) -> np.random.Generator:
    """A generator derived from (seed, epoch, purpose) alone: decisions are reproducible and
    survive a resume without storing generator state, and no global RNG is touched."""
    return np.random.default_rng([int(seed), int(epoch), int(purpose)])
