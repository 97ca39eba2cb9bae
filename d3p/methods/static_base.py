"""The frame of the static selectors (Dyn-Unc, D2 Pruning; public: `d3p.StaticSelector`): full-data warm-up epochs
recording the loss, one selection at the end of warm-up epoch J-1, then training on the fixed subset; and the
warm-up option they share (`STATIC_WARMUP`)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from d3p.methods.common import BaseStrategy, kept_size
from d3p.registry import Option
from d3p.strategy import EpochLosses, EpochPlan

STATIC_WARMUP = Option("static_warmup_epochs", 10, int, "J: full-data epochs before a static selection")


def check_warmup(options: dict[str, Any], epochs: int | None) -> list[str]:
    """A static method's warm-up must leave at least one epoch to train on the subset."""
    warmup = options["static_warmup_epochs"]
    if epochs is not None and not 1 <= warmup < epochs:
        return [f"--static_warmup_epochs must lie in [1, --epochs), got {warmup}"]
    return []


def impute_history(history: np.ndarray) -> tuple[np.ndarray, int]:
    """Fill NaN (sample not seen in an epoch, e.g. a dropped last batch) of a float [J, N] loss history.

    A missing entry gets the sample's mean over its recorded epochs; a sample never seen gets each epoch's dataset
    mean (so its volatility is 0 and Dyn-Unc treats it as stable). Returns (float64 [J, N], number imputed).
    """
    h = np.asarray(history, dtype=np.float64).copy()
    missing = np.isnan(h)
    count = int(missing.sum())
    if count == 0:
        return h, 0
    seen_any = (~missing).any(axis=0)
    with np.errstate(invalid="ignore"):
        sample_mean = np.nanmean(np.where(seen_any, h, 0.0), axis=0)  # [N]; unseen columns handled below
        epoch_mean = np.nanmean(h, axis=1)  # [J]
    fill = np.where(seen_any[None, :], sample_mean[None, :], epoch_mean[:, None])
    h[missing] = fill[missing]
    if np.isnan(h).any():
        raise ValueError("a warm-up epoch recorded no loss at all")
    return h, count


class StaticSelector(BaseStrategy):
    """Warm-up on full data for J epochs recording losses, select once at the end of epoch J-1, then keep the
    subset fixed. `subset` (int64 sorted, or None before the decision) is the selected coreset; the state_dict holds
    it as "subset" (what `d3p-export` reads for a method of kind "static").

    A subclass calls `super().__init__(num_samples, warmup_epochs, prune_ratio, seed)` and implements
    `select(history float64 [J, N], embeddings float [N, D] or None) -> statistics to log`, which sets
    `self.subset`; it may override `warmup_plan(epoch)` (e.g. to ask for embeddings in the last warm-up epoch).
    """

    def __init__(self, num_samples: int, warmup_epochs: int, prune_ratio: float, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if warmup_epochs < 1:
            raise ValueError(f"warmup_epochs must be >= 1, got {warmup_epochs}")
        self.num_samples = int(num_samples)
        self.warmup_epochs = int(warmup_epochs)
        self.prune_ratio = float(prune_ratio)
        self.seed = int(seed)
        self.n_keep = kept_size(self.num_samples, self.prune_ratio)
        self.history = np.full((self.warmup_epochs, self.num_samples), np.nan, dtype=np.float32)
        self.subset: np.ndarray | None = None

    def warmup_plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(kept=np.arange(self.num_samples, dtype=np.int64), record_losses=True)

    def plan_epoch(self, epoch: int) -> EpochPlan:
        if epoch < self.warmup_epochs:
            return self.warmup_plan(epoch)
        if self.subset is None:
            raise RuntimeError(
                f"{self.name}: epoch {epoch} needs the subset selected at the end of warm-up epoch "
                f"{self.warmup_epochs - 1}, but end_epoch({self.warmup_epochs - 1}) was never called"
            )
        return EpochPlan(kept=self.subset.copy(), record_losses=False)

    def select(self, history: np.ndarray, embeddings: np.ndarray | None) -> dict[str, Any]:
        raise NotImplementedError

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        n = self.num_samples
        if epoch >= self.warmup_epochs:
            if self.subset is None:
                raise RuntimeError(f"{self.name}: end_epoch({epoch}) before the subset was selected")
            return {"kept": int(self.subset.size), "epoch_prune_ratio": 1.0 - self.subset.size / n}
        if losses is None:
            raise ValueError(f"{self.name}: warm-up epoch {epoch} needs its recorded losses")
        self.history[epoch] = losses.mean.astype(np.float32)
        log: dict[str, Any] = {"kept": n, "epoch_prune_ratio": 0.0}
        if epoch == self.warmup_epochs - 1:
            t0 = time.perf_counter()
            history, imputed = impute_history(self.history)
            stats = self.select(history, embeddings)
            log.update({f"{self.name}_{key}": value for key, value in stats.items()})
            log[f"{self.name}_imputed_losses"] = imputed
            log[f"{self.name}_selected"] = int(self.subset.size) if self.subset is not None else 0
            log[f"{self.name}_select_seconds"] = time.perf_counter() - t0
        return log

    def base_state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "warmup_epochs": self.warmup_epochs,
            "prune_ratio": self.prune_ratio,
            "seed": self.seed,
            "history": torch.from_numpy(self.history.copy()),
            "subset": None if self.subset is None else torch.from_numpy(self.subset.copy()),
        }

    def state_dict(self) -> dict[str, Any]:
        return self.base_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the recorded history and the subset; hyper-parameters stay the constructor's."""
        self.check_state(state)
        history = state["history"].numpy().astype(np.float32, copy=True)
        if history.shape != self.history.shape:
            raise ValueError(f"state_dict history has shape {history.shape}, expected {self.history.shape}")
        self.history = history
        subset = state.get("subset")
        self.subset = None if subset is None else subset.numpy().astype(np.int64, copy=True)
