"""A pruning method written outside the d3p package, as a user would: this one file is all it takes.

    python main_pretrain_d3p.py --prune_plugin tests/plugins/keep_hardest.py --prune_method keep_hardest \\
        --hardest_ratio 0.25 ...

keep_hardest: epoch 0 trains on everything; every later epoch trains on the round((1 - r) N) samples of highest
loss in the previous epoch that recorded them (ties: the lower index), and records the losses of what it trains.
It uses only the public API of d3p.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

import d3p

HARDEST_RATIO = d3p.Option("hardest_ratio", 0.5, float, "keep_hardest: share of the samples pruned each epoch",
                           valid=lambda r: 0.0 <= r < 1.0, rule="must lie in [0, 1)")


@d3p.register_method("keep_hardest", kind="dynamic", options=[HARDEST_RATIO],
                     help="train on the samples of highest loss in the previous epoch")
class KeepHardest(d3p.BaseStrategy):
    name = "keep_hardest"

    def __init__(self, num_samples: int, hardest_ratio: float = 0.5) -> None:
        self.num_samples = int(num_samples)
        self.keep = max(1, round((1.0 - hardest_ratio) * self.num_samples))
        self.scores = np.full(self.num_samples, np.inf)  # never seen: hardest, so epoch 0 keeps all of them

    def plan_epoch(self, epoch: int) -> d3p.EpochPlan:
        if epoch == 0:
            return d3p.EpochPlan(kept=np.arange(self.num_samples, dtype=np.int64), record_losses=True)
        order = np.lexsort((np.arange(self.num_samples), -self.scores))  # loss descending, then index
        return d3p.EpochPlan(kept=np.sort(order[: self.keep]).astype(np.int64), record_losses=True)

    def end_epoch(self, epoch: int, losses: d3p.EpochLosses | None, embeddings=None) -> dict[str, Any]:
        seen = losses.seen
        self.scores[seen] = losses.mean[seen]
        return {"keep_hardest_seen": int(seen.sum())}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_samples": self.num_samples, "scores": torch.from_numpy(self.scores.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.scores = state["scores"].numpy().astype(np.float64, copy=True)
