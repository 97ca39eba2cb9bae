"""`OrderDP` ('orderdp'): "A Theoretically Guaranteed Lossless Dynamic Data Pruning Framework" (ICLR 2026; code
shengze-xu/OrderDP, cifar/orderDP/orderDP.py) -- each epoch a uniform random pool, of which the highest-loss share
is trained; no reweighting."""
from __future__ import annotations

from typing import Any

import numpy as np

from d3p.methods.common import LossScoredStrategy, kept_size, update_scores
from d3p.registry import Option, register_method
from d3p.strategy import EpochLosses, EpochPlan, epoch_rng

_PURPOSE_ORDERDP = 61
INITIAL_SCORE = 3.0  # the published CIFAR class's initial score (the ImageNet loader starts at 1)
TARGET_TOP_Q = 0.8  # the top-q share a target ratio keeps (the published ImageNet script's q)


def orderdp_sizes(num_samples: int, pool_ratio: float, top_q_ratio: float) -> tuple[int, int]:
    """(pool size, kept size) as the published class truncates them: int(pool_ratio N), int(top_q_ratio pool)."""
    pool = int(pool_ratio * num_samples)
    return pool, int(top_q_ratio * pool)


def target_sizes(num_samples: int, ratio: float) -> tuple[int, int]:
    """(pool size, kept size) that prune exactly round-to-nearest `ratio` of the samples (this project's split of a
    target ratio R, not the paper's): keep K = round((1-R) N) of a pool of round(K / 0.8) (the published ImageNet
    q = 0.8); when that pool exceeds the data, the pool is the whole data and q = 1 - R. q never reaches 1 (that
    is plain random)."""
    kept = kept_size(num_samples, ratio)
    pool = min(num_samples, int(round(kept / TARGET_TOP_Q)))
    if kept >= pool:
        raise ValueError(f"orderdp at target ratio {ratio} keeps {kept} of {num_samples} samples, which leaves no "
                         "pool to select from (q would be 1: plain random). Fix: a larger --orderdp_target_ratio")
    return pool, kept


def top_q_of_pool(scores: np.ndarray, pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """int64 sorted: the `count` members of `pool` with the highest scores (the published torch.topk(largest=True));
    ties, such as the equal initial scores, broken uniformly at random by `rng` (topk's order is unspecified)."""
    order = np.lexsort((rng.random(pool.size), -scores[pool]))  # score descending, then a random key
    return np.sort(pool[order[:count]]).astype(np.int64)


class OrderDP(LossScoredStrategy):
    """OrderDP, as its published code runs (cifar/orderDP/orderDP.py, class OrderDP and its IBSampler).

    Every epoch: a uniform random pool of int(pool_ratio N) samples; the int(top_q_ratio pool) of them with the
    highest score are trained, with weight 1 (the published `update` returns the plain mean). The score of a sample
    is its latest training loss (starting at 3.0, the class's initial score); the samples trained in an epoch get
    their loss of that epoch. The published sampler's two anneal branches both prune, so it never anneals and
    neither does this: every epoch is pruned, `delta` has no effect and is not an option.
    target_ratio: this project's way to realise a chosen ratio (`target_sizes`); None keeps the two shares.
    """

    name = "orderdp"
    hyperparameters = ("pool_ratio", "top_q_ratio", "target_ratio", "seed")

    def __init__(self, num_samples: int, pool_ratio: float = 0.75, top_q_ratio: float = 0.85,
                 target_ratio: float | None = None, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not (0.0 < pool_ratio <= 1.0 and 0.0 < top_q_ratio < 1.0):
            raise ValueError(f"orderdp needs pool_ratio in (0, 1] and top_q_ratio in (0, 1), got {pool_ratio} and "
                             f"{top_q_ratio} (top_q_ratio 1 is plain random)")
        self.num_samples = int(num_samples)
        self.pool_ratio, self.top_q_ratio = float(pool_ratio), float(top_q_ratio)
        self.target_ratio = None if target_ratio is None else float(target_ratio)
        self.seed = int(seed)
        if self.target_ratio is None:
            self.pool_size, self.kept_count = orderdp_sizes(self.num_samples, self.pool_ratio, self.top_q_ratio)
        else:
            self.pool_size, self.kept_count = target_sizes(self.num_samples, self.target_ratio)
        if self.kept_count < 1:
            raise ValueError(f"orderdp keeps {self.kept_count} of {num_samples} samples. Fix: larger shares")
        self.scores = np.full(self.num_samples, INITIAL_SCORE, dtype=np.float64)
        self._last = None

    def plan_with_stats(self, epoch: int) -> tuple[EpochPlan, dict[str, Any]]:
        rng = epoch_rng(self.seed, epoch, _PURPOSE_ORDERDP)
        pool = rng.choice(self.num_samples, size=self.pool_size, replace=False)
        kept = top_q_of_pool(self.scores, pool, self.kept_count, rng)
        return EpochPlan(kept=kept, record_losses=True), {
            "pool": int(pool.size), "kept": int(kept.size),
            "never_trained_kept": int((self.scores[kept] == INITIAL_SCORE).sum())}

    def end_epoch(self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
                  ) -> dict[str, Any]:
        stats = self.stats_of(epoch)
        updated = update_scores(self.scores, losses)
        return {"kept": stats["kept"], "epoch_prune_ratio": 1.0 - stats["kept"] / self.num_samples,
                "orderdp_pool": stats["pool"], "orderdp_initial_score_kept": stats["never_trained_kept"],
                "orderdp_scores_updated": updated}


ORDERDP_OPTIONS = (
    Option("orderdp_pool", 0.75, float, "OrderDP's random_len_ratio: the share of the data drawn as each epoch's "
           "random pool (published class default 0.75)", valid=lambda r: 0.0 < r <= 1.0, rule="must lie in (0, 1]",
           only_for_owner=True),
    Option("orderdp_top_q", 0.85, float, "OrderDP's top_q_ratio: the share of the pool with the highest last loss "
           "that is trained (published class default 0.85; 1 would be plain random)", valid=lambda q: 0.0 < q < 1.0,
           rule="must lie in (0, 1)", only_for_owner=True),
    Option("orderdp_target_ratio", None, float, "prune this share every epoch instead of the two shares (this "
           "project's split: q = 0.8 of a pool of (1-R)/0.8; the whole data and q = 1-R when that exceeds it)",
           valid=lambda r: 0.0 < r < 1.0, rule="must lie in (0, 1)", only_for_owner=True),
)


def _check_orderdp(o: dict[str, Any], epochs: int | None) -> list[str]:
    if o["orderdp_target_ratio"] is not None and (o["orderdp_pool"], o["orderdp_top_q"]) != (0.75, 0.85):
        return ["--orderdp_target_ratio sets the pool and the top-q share itself. Fix: give it, or "
                "--orderdp_pool/--orderdp_top_q, not both"]
    return []


@register_method("orderdp", "dynamic", ORDERDP_OPTIONS, check=_check_orderdp,
                 help="OrderDP: train the highest-loss share of a random pool each epoch (no reweighting)")
def build_orderdp(num_samples: int, seed: int, orderdp_pool: float, orderdp_top_q: float,
                  orderdp_target_ratio: float | None) -> OrderDP:
    return OrderDP(num_samples, orderdp_pool, orderdp_top_q, orderdp_target_ratio, seed=seed)
