"""`RandomDynamic` ('random'): a fresh uniform random subset per epoch, optionally matched epoch by
epoch to the kept counts of a recorded run (option `random_match`)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from d3p.methods.common import PRUNE_RATIO, BaseStrategy, check_ratio, kept_size, uniform_subset
from d3p.registry import Option, register_method
from d3p.strategy import EpochLosses, EpochPlan, epoch_rng


_PURPOSE_RANDOM = 31


class RandomDynamic(BaseStrategy):
    """A fresh uniform random subset each epoch (no weights, no recording).

    Size round((1-r)*N), or exactly kept_counts[epoch] when kept_counts is given (the fair control matched epoch by
    epoch to a recorded D3P run: the counts of its log, indexed by 0-based epoch).
    """

    name = "random"

    def __init__(
        self, num_samples: int, prune_ratio: float = 0.5, seed: int = 0, kept_counts: list[int] | None = None
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        check_ratio(prune_ratio)
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
        self.check_state(state)
        saved = state.get("kept_counts")
        if saved is not None and self.kept_counts is not None and list(saved) != self.kept_counts:
            raise ValueError("state_dict was saved with different kept_counts than this strategy was given")


RANDOM_MATCH = Option(
    "random_match", None,
    help="a recorded run to match: keep as many samples per epoch as it did (entry scripts: its RUN_DIR; "
         "DataPruner: its kept counts, a list indexed by epoch)",
    only_for_owner=True,
)


@register_method("random", "dynamic", (PRUNE_RATIO, RANDOM_MATCH),
                 help="a fresh uniform random subset per epoch (or of the sizes of a recorded run)")
def build_random(num_samples: int, seed: int, prune_ratio: float, random_match: Sequence[int] | None) -> RandomDynamic:
    if isinstance(random_match, (str, bytes)) or (random_match is not None and hasattr(random_match, "__fspath__")):
        raise TypeError(f"random_match takes the kept counts per epoch (a list of ints), got the path "
                        f"{random_match!r}. Fix: read the recorded run's per-epoch kept counts and pass those")
    return RandomDynamic(num_samples, prune_ratio, seed=seed, kept_counts=random_match)
