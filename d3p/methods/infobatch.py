"""`InfoBatch` ('infobatch'): Qin et al., ICLR 2024 -- prune below-mean-loss samples at random,
rescale the rest."""
from __future__ import annotations

from typing import Any

import numpy as np

from d3p.methods.common import DELTA, PRUNE_RATIO, LossScoredStrategy, anneal_start, check_ratio, full_plan, update_scores
from d3p.registry import register_method
from d3p.strategy import EpochLosses, EpochPlan, epoch_rng


# Distinct `purpose` values for epoch_rng, so two random decisions of one epoch never share a stream.
_PURPOSE_INFOBATCH = 11


class InfoBatch(LossScoredStrategy):
    """InfoBatch (Qin et al., ICLR 2024), epoch-level version of spec section 10.

    score[i] = latest training loss of i (float64 [N]); all equal at the start, so epoch 0 keeps everything.
    Epoch e < floor(delta*E): every sample with score strictly below the mean score is pruned independently with
    probability r; kept below-mean samples get weight 1/(1-r), all others 1; batch loss = mean(w*l)
    (normalize_weights=False). Epoch e >= floor(delta*E): full data, weights 1. Losses are recorded every epoch and
    the scores of the samples trained in it are replaced by their loss. Realised ratio = r * (fraction below mean) < r.
    """

    name = "infobatch"
    hyperparameters = ("num_epochs", "prune_ratio", "delta", "seed")

    def __init__(
        self, num_samples: int, num_epochs: int, prune_ratio: float = 0.5, delta: float = 0.875, seed: int = 0
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        check_ratio(prune_ratio)
        self.num_samples = int(num_samples)
        self.num_epochs = int(num_epochs)
        self.prune_ratio = float(prune_ratio)
        self.delta = float(delta)
        self.seed = int(seed)
        self.anneal_epoch = anneal_start(self.num_epochs, self.delta)
        # Equal initial scores (the published code uses 3.0; only equality matters): nothing is below the mean.
        self.scores = np.ones(self.num_samples, dtype=np.float64)
        self._last: tuple[int, dict[str, Any]] | None = None  # (epoch, stats of its plan), recomputable

    def plan_with_stats(self, epoch: int) -> tuple[EpochPlan, dict[str, Any]]:
        n = self.num_samples
        if epoch >= self.anneal_epoch:
            return full_plan(n, record_losses=True, normalize_weights=False), {
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
        stats = self.stats_of(epoch)
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


@register_method("infobatch", "dynamic", (PRUNE_RATIO, DELTA), needs_epochs=True,
                 help="InfoBatch: prune below-mean-loss samples at random, rescale the kept ones")
def build_infobatch(num_samples: int, epochs: int, seed: int, prune_ratio: float, delta: float) -> InfoBatch:
    return InfoBatch(num_samples, epochs, prune_ratio, delta, seed=seed)
