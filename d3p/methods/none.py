"""`NoPruning` ('none'): the whole dataset every epoch."""
from __future__ import annotations

from typing import Any

import numpy as np

from d3p.methods.common import BaseStrategy, full_plan
from d3p.registry import register_method
from d3p.strategy import EpochLosses, EpochPlan


@register_method("none", "dynamic", help="the whole dataset every epoch")
class NoPruning(BaseStrategy):
    """Full data every epoch, no loss recording (the 'Whole dataset' row)."""

    name = "none"

    def __init__(self, num_samples: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)

    def plan_epoch(self, epoch: int) -> EpochPlan:
        return full_plan(self.num_samples, record_losses=False)

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        return {"kept": self.num_samples, "epoch_prune_ratio": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)



