"""`RandomStatic` ('random_static'): the control of the static selectors -- one uniform random subset, chosen where
Dyn-Unc and D2 Pruning select (the end of the warm-up) and trained in every later epoch."""
from __future__ import annotations

from typing import Any

import numpy as np

from d3p.methods.common import PRUNE_RATIO, uniform_subset
from d3p.methods.static_base import STATIC_WARMUP, StaticSelector, check_warmup
from d3p.registry import register_method
from d3p.strategy import epoch_rng

_PURPOSE_RANDOM_STATIC = 71


class RandomStatic(StaticSelector):
    """Warm-up epochs 0..J-1 on the full data (losses recorded, as Dyn-Unc and D2 do, though unused); at the end of
    epoch J-1 a uniform random subset of round((1-r) N) samples, drawn from epoch_rng(seed, J-1), is fixed for all
    later epochs. Separates what a static selector's selection buys from training a fixed subset under the same
    schedule."""

    name = "random_static"

    def select(self, history: np.ndarray, embeddings: np.ndarray | None) -> dict[str, Any]:
        rng = epoch_rng(self.seed, self.warmup_epochs - 1, _PURPOSE_RANDOM_STATIC)
        self.subset = uniform_subset(self.num_samples, self.n_keep, rng)
        return {}


@register_method("random_static", "static", (PRUNE_RATIO, STATIC_WARMUP), check=check_warmup,
                 help="a fixed uniform random subset chosen at the static selectors' warm-up epoch (their control)")
def build_random_static(num_samples: int, seed: int, prune_ratio: float, static_warmup_epochs: int) -> RandomStatic:
    return RandomStatic(num_samples, static_warmup_epochs, prune_ratio, seed)
