"""The public API: `DataPruner`, the one object a training loop uses to prune its data.

    pruner = d3p.DataPruner(len(dataset), method="d3p", epochs=E, seed=0)   # or DataPruner.from_args(args, N)
    loader = DataLoader(IndexedData(dataset), sampler=pruner.sampler, ...)  # items carry their dataset index
    for epoch in range(start_epoch, E):
        pruner.begin_epoch(epoch)                         # the method's plan -> the sampler's index list
        for x, y, index in loader:
            per_sample = criterion(model(x), y)           # reduction="none": float [B]
            loss = pruner.batch_loss(per_sample, index)   # the method's weights; records the losses
            loss.backward(); optimizer.step(); optimizer.zero_grad()
        for x, y, index in forward_only_loader:           # only when pruner.forward_only_indices.size (D3P)
            pruner.record(index, per_sample_no_grad)
        log = pruner.end_epoch(epoch)                     # one reduction across ranks, the decision, the ledger
    checkpoint["pruning"] = pruner.state_dict()           # plain data; pruner.load_state_dict(...) resumes

Negative dataset indices mark a substituted (unreadable) sample: weight 0, no recorded loss.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from d3p.collectives import get_rank, get_world_size
from d3p.distributed import check_ranks_agree, reduce_epoch_losses
from d3p.ledger import CostLedger
from d3p.options import options_of, validate_options
from d3p.recorder import LossRecorder
from d3p.registry import all_options, build, get_method, method_names
from d3p.sampler import PrunedDistributedSampler
from d3p.strategy import EpochLosses, EpochPlan, PruningStrategy

__all__ = ["DataPruner", "build_strategy", "weighted_batch_loss"]


def weighted_batch_loss(per_sample: torch.Tensor, weights: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """per_sample [B], weights [B] or None -> scalar.

    normalize=True: sum(w*l)/sum(w) (D3P, spec §7); False: mean(w*l) (InfoBatch). With weights None
    this is exactly `per_sample.mean()`, MAE's loss.
    """
    if weights is None:
        return per_sample.mean()
    if normalize:
        return (weights * per_sample).sum() / weights.sum()
    return (weights * per_sample).mean()


def build_strategy(method: str, num_samples: int, epochs: int | None = None, seed: int = 0, min_kept: int = 1,
                   knn_device: str = "cpu", **options: Any) -> PruningStrategy:
    """The strategy of the registered method `method` (`d3p.registry`), configured from `options` (the options of
    any registered method are accepted; the method takes its own, defaults filled in)."""
    unknown = sorted(set(options) - set(all_options()))
    if unknown:
        raise TypeError(f"unknown pruning option(s) {unknown}; valid: {', '.join(all_options())}")
    context = {"epochs": epochs, "seed": seed, "min_kept": min_kept, "knn_device": knn_device}
    return build(method, num_samples, context, options)


class DataPruner:
    """Dynamic data pruning for any training loop: the sampler, the weighted batch loss, loss recording,
    the per-epoch decision (reduced across ranks), the cost ledger and the resumable state of one run.

    num_samples: dataset size N (indices 0..N-1 reach `batch_loss` with each batch).
    method: a registered method's name (`d3p.registry`: the built-ins and those of imported plugins), or any object
            implementing `d3p.strategy.PruningStrategy`.
    epochs: the run's total epochs (the schedules of d3p, infobatch, seta depend on it).
    seed: the same on every rank; decisions and shuffles derive from (seed, epoch) only.
    min_kept: a decision never keeps fewer samples (use batch_size * world_size).
    num_replicas, rank: default from torch.distributed when initialised, else 1 and 0.
    knn_device: where D2's k-NN runs (the training device).
    **options: the method's options, named as the flags (`d3p.registry.get_method(name).options`).
    """

    def __init__(self, num_samples: int, method: str | PruningStrategy = "d3p", epochs: int | None = None,
                 seed: int = 0, *, min_kept: int = 1, num_replicas: int | None = None, rank: int | None = None,
                 knn_device: str = "cpu", **options: Any):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}: the dataset is empty")
        if isinstance(method, str):
            problems = validate_options(method, epochs, options)
            if problems:
                raise ValueError("; ".join(problems))
            self.strategy = build_strategy(method, int(num_samples), epochs, seed, min_kept, knn_device, **options)
        else:
            self.strategy = method
        if self.strategy.num_samples != int(num_samples):
            raise ValueError(f"the strategy was built for {self.strategy.num_samples} samples, not {num_samples}")
        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        self.seed = int(seed)
        own = get_method(self.strategy.name).options if self.strategy.name in method_names() else ()
        self.options = {o.name: options.get(o.name, o.default) for o in own}
        # the training sampler and the forward-only one (D3P's recording epochs) use different shuffles
        self.sampler = PrunedDistributedSampler(num_samples, num_replicas, rank, seed=self.seed)
        self.forward_sampler = PrunedDistributedSampler(num_samples, num_replicas, rank, seed=self.seed + 1)
        self.ledger = CostLedger(self.strategy.num_samples)
        # epochs each sample was trained in with gradient (d3p.export --counts): 4 bytes per sample
        self.trained_counts = np.zeros(self.strategy.num_samples, dtype=np.int32)
        self.plan: EpochPlan | None = None
        self.fingerprint = 0
        self.recorder: LossRecorder | None = None
        self._weights: torch.Tensor | None = None  # this epoch's [N] weights on the loss's device
        self._epoch_start = 0.0
        self._batches = 0
        self._forward_recorded = False

    @classmethod
    def from_args(cls, args, num_samples: int, min_kept: int = 1, **kwargs: Any) -> "DataPruner":
        """From flags added by `d3p.add_pruning_args` (+ `--epochs`, `--seed`, `--device`); `kwargs` (options or
        DataPruner's keywords) take precedence over the flags, e.g. random_match=<kept counts read from a run>."""
        return cls(num_samples, args.prune_method, args.epochs, args.seed, min_kept=min_kept,
                   knn_device=getattr(args, "device", None) or "cpu", **{**options_of(args), **kwargs})

    @property
    def num_samples(self) -> int:
        return self.strategy.num_samples

    @property
    def method(self) -> str:
        return self.strategy.name

    # ------------------------------------------------------------------------------------- the epoch
    def begin_epoch(self, epoch: int) -> EpochPlan:
        """Ask the method for the epoch's plan, prove the ranks agree, rebuild the samplers."""
        plan = self.strategy.plan_epoch(epoch)
        self.fingerprint = check_ranks_agree(plan, epoch)
        self.sampler.set_indices(plan.kept)
        self.sampler.set_epoch(epoch)
        if plan.forward_only.size:
            self.forward_sampler.set_indices(plan.forward_only)
            self.forward_sampler.set_epoch(epoch)
        self.plan = plan
        self.recorder = LossRecorder(self.num_samples) if plan.record_losses else None
        self._weights = None
        if plan.weights is not None:
            self._weights = torch.from_numpy(np.ascontiguousarray(plan.weights, dtype=np.float32))
        self._epoch_start = time.time()
        self._batches = 0
        self._forward_recorded = False
        return plan

    @property
    def forward_only_indices(self) -> np.ndarray:
        """int64 [M]: samples that need a no-grad forward pass this epoch (`pruner.forward_sampler` yields
        this rank's share); record their losses with `record`. Empty for most epochs and methods."""
        if self.plan is None or self.recorder is None:
            return np.zeros(0, dtype=np.int64)
        return self.plan.forward_only

    @property
    def needs_embeddings(self) -> bool:
        """True: pass `embeddings=` float [N, D] features of every sample to this epoch's `end_epoch` (D2)."""
        return bool(self.plan is not None and self.plan.compute_embeddings)

    def embedding_sampler(self) -> PrunedDistributedSampler:
        """Every sample once, in index order, split across ranks (for the embedding pass)."""
        return PrunedDistributedSampler(self.num_samples, self.sampler.num_replicas, self.sampler.rank, shuffle=False)

    def batch_weights(self, indices: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
        """float32 [B] weights of the batch's samples on `device` (None: all ones). Negative indices: weight 0."""
        if self.plan is None:
            raise RuntimeError("DataPruner.begin_epoch(epoch) must be called before the epoch's first batch")
        valid = indices >= 0
        weights = None
        if self._weights is not None:
            if self._weights.device != torch.device(device):  # once per epoch: [N] floats to the device
                self._weights = self._weights.to(device)
            weights = self._weights[indices.clamp(min=0).to(self._weights.device, non_blocking=True)]
        if not bool(valid.all()):
            valid = valid.to(device, torch.float32)
            weights = valid if weights is None else weights * valid
        return weights

    def batch_loss(self, per_sample: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The batch's loss from per-sample losses [B] and dataset indices int64 [B]: sum(w l)/sum(w) for D3P,
        mean(w l) for InfoBatch/SeTa, mean(l) with no weights. Records the losses when the method needs them."""
        weights = self.batch_weights(indices, per_sample.device)
        loss = weighted_batch_loss(per_sample.float(), weights, self.plan.normalize_weights)
        if self.recorder is not None:
            self.recorder.record(indices, per_sample)
        self._batches += 1
        return loss

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Losses [B] of samples outside the training pass (the forward-only pass over
        `forward_only_indices`); charged to the ledger as forward-only work."""
        if self.recorder is not None:
            self.recorder.record(indices, losses)
            self._forward_recorded = True

    def carry_over(self, loss_sum: np.ndarray, count: np.ndarray) -> None:
        """Losses recorded in this epoch before a preemption (resuming mid-epoch; give them on one rank)."""
        if self.recorder is not None:
            self.recorder.carry_over(loss_sum, count)

    def epoch_losses(self) -> EpochLosses | None:
        """The losses recorded so far this epoch, summed over ranks (a collective: call it on every rank)."""
        if self.recorder is None:
            return None
        return reduce_epoch_losses(*self.recorder.totals())

    def end_epoch(self, epoch: int, embeddings: np.ndarray | None = None, *, optimizer_steps: int | None = None,
                  data_seconds: float = 0.0, started: float | None = None) -> dict[str, Any]:
        """Reduce the epoch's losses across ranks (once), let the method decide, charge the ledger.

        embeddings: float [N, D] when `needs_embeddings`. optimizer_steps: default the batches of this rank.
        started: time.time() at the epoch's start (default: `begin_epoch`'s call).
        Returns the fields to log: the ledger's (samples_trained, kept, pruned, prune_ratio, compute_saved, ...),
        plan_fingerprint, and the method's decision statistics.
        """
        if self.plan is None:
            raise RuntimeError("DataPruner.end_epoch called without begin_epoch")
        decision = self.strategy.end_epoch(epoch, self.epoch_losses(), embeddings) or {}
        forward_seen = self.forward_sampler.total_size if self._forward_recorded else 0
        if embeddings is not None:
            forward_seen += self.num_samples
        self.recorder = None
        self.trained_counts[self.plan.kept] += 1
        costs = self.ledger.record_epoch(
            epoch,
            samples_trained=self.sampler.total_size,
            samples_forward_only=forward_seen,
            optimizer_steps=self._batches if optimizer_steps is None else optimizer_steps,
            epoch_seconds=time.time() - (self._epoch_start if started is None else started),
            data_seconds=data_seconds,
            kept=int(self.plan.kept.size),
        )
        costs.pop("epoch")
        return {**costs, "plan_fingerprint": self.fingerprint, **decision}

    def summary(self) -> dict[str, Any]:
        """Whole-run figures for summary.json: method, seed, world size, the ledger's totals, the method's options."""
        return {
            "method": self.method,
            "seed": self.seed,
            "world_size": self.sampler.num_replicas,
            **self.ledger.summary(),
            "flags": dict(self.options),
        }

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.strategy.name,
            "num_samples": self.num_samples,
            "strategy": self.strategy.state_dict(),
            "ledger": self.ledger.state_dict(),
            "trained_counts": torch.from_numpy(self.trained_counts.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.strategy.name:
            raise ValueError(
                f"checkpoint was written by --prune_method {state['method']}, this run uses "
                f"{self.strategy.name}. Fix: resume with --prune_method {state['method']}, or use a new --output_dir"
            )
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"checkpoint's dataset has {state['num_samples']} samples, this one {self.num_samples}. "
                "Fix: resume with the same dataset, or use a new --output_dir"
            )
        self.strategy.load_state_dict(state["strategy"])
        self.ledger.load_state_dict(state["ledger"])
        counts = state.get("trained_counts")  # absent in checkpoints of early versions of this fork
        if counts is None:
            counts = torch.zeros(self.num_samples, dtype=torch.int32)
        self.trained_counts = counts.numpy().astype(np.int32).copy()
