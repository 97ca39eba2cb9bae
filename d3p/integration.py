"""The thin layer the engine calls: plan -> sampler, recorded losses -> strategy, costs -> ledger."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from d3p.distributed import check_ranks_agree, reduce_epoch_losses
from d3p.ledger import CostLedger
from d3p.recorder import LossRecorder
from d3p.sampler import PrunedDistributedSampler
from d3p.schedule import D3PSchedule
from d3p.strategy import EpochPlan, PruningStrategy

PRUNE_METHODS = ("d3p", "none", "infobatch", "seta", "random", "dynunc", "d2")


def build_strategy(args, num_samples: int, min_kept: int = 1) -> PruningStrategy:
    """The strategy named by `--prune_method`, configured from the parsed flags."""
    method = args.prune_method
    if method == "d3p":
        from d3p.method import D3P

        schedule = D3PSchedule(args.d3p_start, args.d3p_period, args.d3p_window, args.epochs, args.d3p_anneal_epochs)
        return D3P(num_samples, schedule, args.d3p_bins, args.d3p_quantile, seed=args.seed, min_kept=min_kept)
    if method == "none":
        from d3p.baselines import NoPruning

        return NoPruning(num_samples)
    if method == "infobatch":
        from d3p.baselines import InfoBatch

        return InfoBatch(num_samples, args.epochs, args.prune_ratio, args.delta, seed=args.seed)
    if method == "seta":
        from d3p.baselines import SeTa

        return SeTa(num_samples, args.epochs, args.prune_ratio, args.seta_groups, args.seta_window_scale,
                    args.delta, seed=args.seed)
    if method == "random":
        from d3p.baselines import RandomDynamic, read_kept_counts

        counts = read_kept_counts(args.random_match) if args.random_match else None
        return RandomDynamic(num_samples, args.prune_ratio, seed=args.seed, kept_counts=counts)
    if method == "dynunc":
        from d3p.static import DynUnc

        return DynUnc(num_samples, args.static_warmup_epochs, args.prune_ratio, args.dynunc_window, seed=args.seed)
    if method == "d2":
        from d3p.static import D2Pruning

        # the k-NN runs on the training device (faiss-gpu or torch on CUDA; faiss IVF at scale on CPU)
        return D2Pruning(num_samples, args.static_warmup_epochs, args.prune_ratio, args.d2_neighbors,
                         args.d2_gamma, args.d2_mode, args.d2_sampling, seed=args.seed,
                         knn_device=getattr(args, "device", None) or "cpu", knn_backend=args.d2_knn,
                         knn_index=args.d2_knn_index, nprobe=args.d2_nprobe)
    raise ValueError(f"unknown --prune_method {method}; choose one of {', '.join(PRUNE_METHODS)}")


class PruningController:
    """Owns the strategy, the two samplers (training, forward-only) and the ledger for a run."""

    def __init__(
        self,
        strategy: PruningStrategy,
        train_sampler: PrunedDistributedSampler,
        forward_sampler: PrunedDistributedSampler | None = None,
    ):
        self.strategy = strategy
        self.train_sampler = train_sampler
        self.forward_sampler = forward_sampler
        self.ledger = CostLedger(strategy.num_samples)
        # epochs each sample was trained in with gradient (d3p.export --counts): 4 bytes per sample
        self.trained_counts = np.zeros(strategy.num_samples, dtype=np.int32)
        self.plan: EpochPlan | None = None
        self.fingerprint = 0

    @property
    def num_samples(self) -> int:
        return self.strategy.num_samples

    def begin_epoch(self, epoch: int) -> EpochPlan:
        """Ask the strategy for the epoch's plan, prove the ranks agree, rebuild the samplers."""
        plan = self.strategy.plan_epoch(epoch)
        self.fingerprint = check_ranks_agree(plan, epoch)
        self.train_sampler.set_indices(plan.kept)
        self.train_sampler.set_epoch(epoch)
        if self.forward_sampler is not None and plan.forward_only.size:
            self.forward_sampler.set_indices(plan.forward_only)
            self.forward_sampler.set_epoch(epoch)
        self.plan = plan
        return plan

    def sample_weights(self) -> torch.Tensor | None:
        """float32 [N] CPU tensor of this epoch's weights (None: all ones)."""
        if self.plan is None or self.plan.weights is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(self.plan.weights, dtype=np.float32))

    def new_recorder(self) -> LossRecorder | None:
        return LossRecorder(self.num_samples) if self.plan is not None and self.plan.record_losses else None

    def end_epoch(self, epoch: int, recorder: LossRecorder | None, embeddings: np.ndarray | None = None) -> dict[str, Any]:
        """Reduce the epoch's losses across ranks (once) and hand them to the strategy."""
        losses = None
        if recorder is not None:
            loss_sum, count = recorder.totals()
            losses = reduce_epoch_losses(loss_sum, count)
        return self.strategy.end_epoch(epoch, losses, embeddings) or {}

    def record_costs(self, epoch: int, optimizer_steps: int, epoch_seconds: float, data_seconds: float,
                     forward_only_seen: int) -> dict[str, Any]:
        assert self.plan is not None
        self.trained_counts[self.plan.kept] += 1
        return self.ledger.record_epoch(
            epoch,
            samples_trained=self.train_sampler.total_size,
            samples_forward_only=forward_only_seen,
            optimizer_steps=optimizer_steps,
            epoch_seconds=epoch_seconds,
            data_seconds=data_seconds,
            kept=int(self.plan.kept.size),
        )

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
