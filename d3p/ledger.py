"""The cost ledger (spec §9), the same for every method.

Compute and loader costs differ: a forward-only sample (D3P's loss pass over the pruned set, an embedding
pass) costs about a third of a trained sample's compute but a full decode and augmentation in the loader.
So `compute_saved` counts it as 1/3 and `loader_saved` as 1: a loader-bound run saves `loader_saved`, not
`compute_saved`.
"""
from __future__ import annotations

from typing import Any

FORWARD_ONLY_COST = 1.0 / 3.0  # a forward pass is about a third of forward + backward


class CostLedger:
    """Per-epoch and whole-run accounting of what training actually cost."""

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)
        self.epochs: list[dict[str, Any]] = []

    def record_epoch(
        self,
        epoch: int,
        samples_trained: int,
        samples_forward_only: int,
        optimizer_steps: int,
        epoch_seconds: float,
        data_seconds: float,
        kept: int,
    ) -> dict[str, Any]:
        """Append one epoch; returns the per-epoch fields plus the run-so-far figures."""
        self.epochs = [e for e in self.epochs if e["epoch"] < epoch]  # an epoch replayed after a restart replaces its record
        self.epochs.append(
            {
                "epoch": int(epoch),
                "samples_trained": int(samples_trained),
                "samples_forward_only": int(samples_forward_only),
                "optimizer_steps": int(optimizer_steps),
                "epoch_seconds": float(epoch_seconds),
                "data_seconds": float(data_seconds),
                "kept": int(kept),
                "pruned": int(self.num_samples - kept),
                # this epoch's own share of samples not trained (the run's figure is run_prune_ratio)
                "epoch_prune_ratio": 1.0 - int(kept) / self.num_samples,
                # images the loaders decoded this epoch: trained + forward-only (loss and embedding passes)
                "samples_loaded": int(samples_trained) + int(samples_forward_only),
                "seconds_per_trained_sample": float(epoch_seconds) / max(int(samples_trained), 1),
            }
        )
        out = dict(self.epochs[-1])
        out.update(self.totals())
        return out

    def totals(self) -> dict[str, Any]:
        n_epochs = len(self.epochs)
        trained = sum(e["samples_trained"] for e in self.epochs)
        fwd = sum(e["samples_forward_only"] for e in self.epochs)
        full = max(n_epochs * self.num_samples, 1)
        wall = sum(e["epoch_seconds"] for e in self.epochs)
        return {
            "epochs_done": n_epochs,
            "total_samples_trained": trained,
            "total_samples_forward_only": fwd,
            "total_optimizer_steps": sum(e["optimizer_steps"] for e in self.epochs),
            # the paper's prune ratio of the run so far: 1 - trained / (epochs * N), cumulative over epochs
            "run_prune_ratio": 1.0 - trained / full,
            "compute_saved": 1.0 - (trained + FORWARD_ONLY_COST * fwd) / full,
            "total_samples_loaded": trained + fwd,
            "loader_saved": 1.0 - (trained + fwd) / full,
            "wall_seconds": wall,
            "run_seconds_per_trained_sample": wall / max(trained, 1),
            "total_data_seconds": sum(e["data_seconds"] for e in self.epochs),
        }

    def summary(self) -> dict[str, Any]:
        """Whole-run figures for summary.json (names as in the issue)."""
        t = self.totals()
        return {
            "epochs": t["epochs_done"],
            "num_samples": self.num_samples,
            "samples_trained": t["total_samples_trained"],
            "samples_forward_only": t["total_samples_forward_only"],
            "optimizer_steps": t["total_optimizer_steps"],
            "prune_ratio": t["run_prune_ratio"],  # the run's (summary.json describes the whole run)
            "compute_saved": t["compute_saved"],
            "samples_loaded": t["total_samples_loaded"],
            "loader_saved": t["loader_saved"],
            "wall_seconds": t["wall_seconds"],
            "seconds_per_trained_sample": t["run_seconds_per_trained_sample"],
            "data_seconds": t["total_data_seconds"],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_samples = int(state["num_samples"])
        self.epochs = [dict(e) for e in state["epochs"]]
