"""The public API: `DataPruner`, the one object a training loop uses to prune its data.

The short form (docs/library.md): five changed lines, the forward-only pass and the indices handled here.

    pruner = d3p.DataPruner(len(dataset), "d3p", epochs=E, loss_fn=per_sample_loss)    # loss_fn: -> float [B]
    for epoch in range(start_epoch, E):
        for x, y in pruner.epoch(loader, epoch, model):   # begin_epoch; after the last batch: forward-only, end_epoch
            loss = pruner.loss(model(x), y)               # the same loss_fn, per sample, weighted, recorded
    checkpoint["pruning"] = pruner.state_dict()           # and pruner.load_state_dict(checkpoint["pruning"])

Every hook, explicitly (examples/train_classifier_explicit.py):

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

import logging
import time
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch

from d3p.collectives import all_gather_within, get_rank, get_world_size, is_dist, to_collective
from d3p.data import pruned_loader
from d3p.distributed import RankDivergenceError, check_ranks_agree, reduce_epoch_losses
from d3p.ledger import CostLedger
from d3p.messages import in_keywords, warn_at_caller
from d3p.options import options_of, preset_options, validate_options
from d3p.recorder import LossRecorder
from d3p.registry import all_options, build, get_method, method_names
from d3p.sampler import PrunedDistributedSampler
from d3p.strategy import EpochLosses, EpochPlan, PruningStrategy

__all__ = ["DataPruner", "build_strategy", "weighted_batch_loss"]

logger = logging.getLogger("d3p")


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
    num_replicas, rank: default: read from torch.distributed at every `begin_epoch` (a pruner built before
        `init_process_group` still splits the data across the ranks), else 1 and 0.
    knn_device: where D2's k-NN runs (the training device).
    loss_fn: (outputs, targets) -> float [B] per-sample losses: the one loss of both passes (`loss`, `epoch`).
    sync_timeout: seconds `begin_epoch`/`end_epoch` wait for the other ranks before an error names the call.
    loss_kind: "classification" (the default, safe for any loss: the options not given take their classification
        defaults, which turn D3P's safety rails on; docs/supervised.md) or "reconstruction" (MAE's reconstruction
        loss, what D3P was published and validated on: the published method, no rails).
    log_epochs: True: one line per epoch through `logging` (logger "d3p", level INFO; `epoch_summary`).
    **options: the method's options, named as the flags (`d3p.registry.get_method(name).options`).
    """

    def __init__(self, num_samples: int, method: str | PruningStrategy = "d3p", epochs: int | None = None,
                 seed: int = 0, *, min_kept: int = 1, num_replicas: int | None = None, rank: int | None = None,
                 knn_device: str = "cpu", loss_fn: Callable[..., torch.Tensor] | None = None,
                 sync_timeout: float = 1800.0, loss_kind: str = "classification", log_epochs: bool = False,
                 _flags: bool = False, **options: Any):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}: the dataset is empty")
        options = {**preset_options(loss_kind), **options}
        self.loss_kind = loss_kind
        self._flags = _flags  # built from command-line flags (from_args): messages name flags, else keywords
        self.epochs = epochs
        self.log_epochs = bool(log_epochs)
        if isinstance(method, str):
            problems = validate_options(method, epochs, options)
            if problems:
                raise ValueError(self._speak("; ".join(problems)))
            self.strategy = build_strategy(method, int(num_samples), epochs, seed, min_kept, knn_device, **options)
        else:
            self.strategy = method
        if self.strategy.num_samples != int(num_samples):
            raise ValueError(f"the strategy was built for {self.strategy.num_samples} samples, not {num_samples}")
        # None: read from torch.distributed at each begin_epoch, so that a pruner built before
        # init_process_group does not train every rank on the whole kept set
        self._ranks_from_dist = num_replicas is None and rank is None
        if num_replicas is None and rank is not None or num_replicas is not None and rank is None:
            raise ValueError("give both num_replicas and rank, or neither (then they come from torch.distributed)")
        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        self.loss_fn = loss_fn
        self.sync_timeout = float(sync_timeout)
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
        self._epoch: int | None = None
        self._pending_index: torch.Tensor | None = None  # the batch `epoch()` yielded last, until `loss` takes it
        self._samples_seen = 0  # samples this rank passed through batch_loss this epoch (what the model trained)
        self._open = False  # begin_epoch ran and end_epoch has not yet
        self._left_early = False  # pruner.epoch was left before its end (warned once)
        self._loaders: dict[int, tuple[Any, Any, Any]] = {}  # id(user loader) -> (it, train loader, forward loader)
        self.last_log: dict[str, Any] | None = None  # end_epoch's log of the last epoch `epoch()` ran

    @classmethod
    def from_args(cls, args, num_samples: int, min_kept: int = 1, **kwargs: Any) -> "DataPruner":
        """From flags added by `d3p.add_pruning_args` (+ `--epochs`, `--seed`, `--device`); `kwargs` (options or
        DataPruner's keywords) take precedence over the flags, e.g. random_match=<kept counts read from a run>."""
        return cls(num_samples, args.prune_method, args.epochs, args.seed, min_kept=min_kept,
                   knn_device=getattr(args, "device", None) or "cpu", _flags=True,
                   **{**options_of(args), **kwargs})

    @property
    def num_samples(self) -> int:
        return self.strategy.num_samples

    def _speak(self, message: str) -> str:
        """`message` in the caller's terms: flags for a pruner built from flags (the scripts), else keywords."""
        return message if self._flags else in_keywords(message)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options.items() if k in ("prune_ratio", "d3p_max_weight", "d3p_min_kept",
                                                                   "d3p_start", "d3p_period", "d3p_window")}
        last = self.ledger.epochs[-1] if self.ledger.epochs else None
        totals = self.ledger.totals() if last is not None else {}
        where = ("no epoch yet" if last is None else
                 f"after epoch {last['epoch']}: kept {last['kept']}/{self.num_samples}, run prune ratio "
                 f"{totals['run_prune_ratio']:.3f}, compute saved {totals['compute_saved']:.3f}")
        options = "".join(f", {k}={v!r}" for k, v in changed.items())
        return (f"DataPruner({self.num_samples}, method={self.method!r}, epochs={self.epochs}, seed={self.seed}"
                f"{options}, world_size={self.sampler.num_replicas}; {where})")

    @property
    def method(self) -> str:
        return self.strategy.name

    # ------------------------------------------------------------------------------------- the epoch
    def _same_call_on_every_rank(self, call: str, epoch: int) -> tuple[int, int]:
        """One all-gather of (call, epoch, samples, batch_loss calls): every rank must be in the same pruner call,
        or the error names it (rather than a collective of another call matching this one, or a silent hang).
        Returns the samples and batch_loss calls of this epoch summed over the ranks."""
        if not is_dist():
            return self._samples_seen, self._batches
        calls = ("begin_epoch", "end_epoch")
        mine = torch.tensor([calls.index(call), int(epoch), self._samples_seen, self._batches], dtype=torch.int64)
        gathered = [tuple(int(v) for v in t.cpu()) for t in
                    all_gather_within(to_collective(mine), self.sync_timeout, f"DataPruner.{call}({epoch})")]
        got = [g[:2] for g in gathered]
        if len(set(got)) != 1:
            where = ", ".join(f"rank {r}: {calls[c]}({e})" for r, (c, e) in enumerate(got))
            raise RankDivergenceError(
                f"the ranks are in different DataPruner calls ({where}). Every rank must call begin_epoch and "
                "end_epoch for every epoch, in the same order. Fix: call them outside any `if rank == 0:`")
        return sum(g[2] for g in gathered), sum(g[3] for g in gathered)

    def _refresh_ranks(self) -> None:
        """Re-read world size and rank (when not given): the process group may have started after __init__."""
        if not self._ranks_from_dist:
            return
        world, rank = get_world_size(), get_rank()
        if (world, rank) != (self.sampler.num_replicas, self.sampler.rank):
            self.sampler.set_replicas(world, rank)
            self.forward_sampler.set_replicas(world, rank)

    def begin_epoch(self, epoch: int) -> EpochPlan:
        """Ask the method for the epoch's plan, prove the ranks agree, rebuild the samplers."""
        self._warn_epoch_order(int(epoch))
        self._same_call_on_every_rank("begin_epoch", epoch)
        self._refresh_ranks()
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
        self._epoch = int(epoch)
        self._pending_index = None
        self._samples_seen = 0
        self._open, self._left_early = True, False
        return plan

    def _warn_epoch_order(self, epoch: int) -> None:
        """Warn (at the caller's line) of an epoch begun twice, an epoch whose end_epoch never ran, and an epoch
        past `epochs`: each silently loses or misplaces decisions."""
        if self._open and not self._left_early:
            if epoch == self._epoch:
                warn_at_caller(f"begin_epoch({epoch}) was called twice without end_epoch({epoch}) between: the "
                               "losses recorded since the first call are dropped. Fix: call begin_epoch once per "
                               "epoch (pruner.epoch(loader, epoch, model) calls it for you)")
            else:
                warn_at_caller(f"begin_epoch({epoch}) without end_epoch({self._epoch}): epoch {self._epoch}'s "
                               "losses and decision are lost. Fix: call pruner.end_epoch(epoch) on every rank after "
                               "each epoch's last batch (pruner.epoch(loader, epoch, model) calls it for you)")
        if self.epochs is not None and epoch >= self.epochs:
            warn_at_caller(f"epoch {epoch} is past the run's epochs: the pruner was built with "
                           + self._speak(f"--epochs {self.epochs}") + " (epochs 0.."
                           f"{self.epochs - 1}), so the method's schedule ended (no more decisions, annealing "
                           "over). Fix: " + self._speak(f"build the pruner with --epochs {epoch + 1} or more")
                           + " (the number of epochs the loop runs)")

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
            raise RuntimeError(
                "no epoch has begun: DataPruner.begin_epoch(epoch) must run before the epoch's first batch. Fix: "
                "with Lightning add callbacks=[d3p.PruningCallback(pruner)] to L.Trainer; with the Hugging Face "
                "Trainer use d3p.PruningTrainer(..., pruner=pruner); in your own loop iterate "
                "`for batch in pruner.epoch(loader, epoch, model)` or call pruner.begin_epoch(epoch)")
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

    def _check_batch(self, per_sample: torch.Tensor, indices: torch.Tensor) -> None:
        """Shapes and dtypes only (no device sync): a mistake here would otherwise weigh or record wrong samples."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (
                torch.int64, torch.int32):
            what = type(indices).__name__ if not isinstance(indices, torch.Tensor) else \
                f"{indices.dtype} tensor of shape {tuple(indices.shape)}"
            raise TypeError(f"the batch's dataset indices must be an int64 tensor [B], got {what}. Fix: make each "
                            "item carry its index (wrap the dataset in d3p.IndexedDataset) and pass that column")
        if not isinstance(per_sample, torch.Tensor) or per_sample.dim() != 1:
            shape = tuple(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
            raise ValueError(f"DataPruner needs one loss per sample, float [B], got shape {shape}"
                             + (" (a scalar: the loss was already reduced over the batch). Fix: compute the loss "
                                "with reduction='none', e.g. F.cross_entropy(logits, y, reduction='none') or "
                                "d3p.per_sample_cross_entropy" if shape == () else
                                ". Fix: reduce every dimension but the batch's, e.g. loss.flatten(1).mean(1)"))
        if per_sample.shape[0] != indices.shape[0]:
            raise ValueError(f"{per_sample.shape[0]} per-sample losses for {indices.shape[0]} dataset indices: "
                             "the loss and the indices must come from the same batch, in the same order. Fix: "
                             "compute the loss on the whole batch whose indices you pass (no slicing, Mixup pairs "
                             "or drop of the last sample after reading the indices)")

    def batch_loss(self, per_sample: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The batch's loss from per-sample losses [B] and dataset indices int64 [B]: sum(w l)/sum(w) for D3P,
        mean(w l) for InfoBatch/SeTa, mean(l) with no weights. Records the losses when the method needs them."""
        self._check_batch(per_sample, indices)
        weights = self.batch_weights(indices, per_sample.device)
        loss = weighted_batch_loss(per_sample.float(), weights, self.plan.normalize_weights)
        if self.recorder is not None:
            self.recorder.record(indices, per_sample)
        self._batches += 1
        self._samples_seen += int(indices.numel())
        return loss

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Losses [B] of samples outside the training pass (the forward-only pass over
        `forward_only_indices`); charged to the ledger as forward-only work."""
        if self.recorder is not None:
            self._check_batch(losses, indices)
            self.recorder.record(indices, losses)
            self._forward_recorded = True

    # ------------------------------------------------------------------ the short form: loss_fn + epoch()
    def per_sample_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """`loss_fn(outputs, targets)` -> float [B]: the one loss of the training and the forward-only pass."""
        if self.loss_fn is None:
            raise TypeError("this DataPruner has no loss_fn. Fix: DataPruner(..., loss_fn=f) with f(outputs, "
                            "targets) -> one loss per sample (e.g. d3p.per_sample_cross_entropy, or "
                            "nn.CrossEntropyLoss(reduction='none')), or call batch_loss(per_sample, indices)")
        return self.loss_fn(outputs, targets)

    def loss(self, outputs: Any, targets: Any, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's training loss: `loss_fn` per sample, then `batch_loss` (the method's weights, recorded).

        indices: int64 [B]; default: those of the batch `epoch()` yielded last (each batch's indices serve
        one call)."""
        if indices is None:
            if self._pending_index is None:
                raise ValueError("no dataset indices for this batch: iterate `for batch in pruner.epoch(loader, "
                                 "epoch, model)` (it carries them), or pass them: pruner.loss(outputs, targets, "
                                 "indices) with items from d3p.IndexedDataset. One call per batch")
            indices, self._pending_index = self._pending_index, None
        return self.batch_loss(self.per_sample_loss(outputs, targets), indices)

    def _loaders_for(self, loader: Any) -> tuple[Any, Any]:
        """(training loader, forward-only loader): `loader`'s settings over its dataset, drawing from this
        pruner's samplers. Built once per user loader (persistent workers stay alive)."""
        cached = self._loaders.get(id(loader))
        if cached is None or cached[0] is not loader:
            cached = (loader, pruned_loader(loader, self.sampler), pruned_loader(loader, self.forward_sampler))
            self._loaders[id(loader)] = cached
        return cached[1], cached[2]

    def epoch(self, loader: Any, epoch: int, model: torch.nn.Module | None = None,
              forward: Callable[[Any], torch.Tensor] | None = None) -> Iterator[Any]:
        """One epoch of `loader`'s batches, pruned: `begin_epoch(epoch)`; the batches of the kept samples,
        as `loader` would give them (its collate_fn, workers, ...), each batch's indices kept for `loss`;
        after the last batch, the forward-only pass when the method needs one (D3P's recording epochs; nothing
        otherwise) and `end_epoch(epoch)`, whose log is then `pruner.last_log`.

        loader: the DataLoader of the unpruned run (shuffle=True or a DistributedSampler; its sampler is
            replaced by `pruner.sampler`). Batches of (inputs, targets).
        model: what the forward-only pass runs, as is (the same mode as training), without gradient.
        forward: batch -> float [B] per-sample losses for the forward-only pass (default: `loss_fn(model(
            inputs), targets)` on the model's device). Give it when the training step does more (autocast, ...).
        A loop that breaks out early skips the epoch's end (a warning says so): call `end_epoch` then, on every
        rank.
        """
        dataset_size = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
        if dataset_size is not None and dataset_size != self.num_samples:
            raise ValueError(
                f"the loader's dataset has {dataset_size} samples, but the pruner was built for {self.num_samples}: "
                + ("it would never draw the last " + str(dataset_size - self.num_samples) if dataset_size >
                   self.num_samples else "it would draw indices past the dataset's end")
                + ". Fix: " + self._speak("build the pruner with the dataset's size, DataPruner(len(train_set), "
                                          "...)"))
        train_loader, forward_loader = self._loaders_for(loader)
        self.begin_epoch(epoch)
        self.last_log = None
        finished = False
        try:
            for batch, indices in train_loader:
                if self._pending_index is not None:
                    raise ValueError("the previous batch's indices were never used: call pruner.loss(outputs, "
                                     "targets) once per batch (or batch_loss(per_sample, indices))")
                self._pending_index = indices
                yield batch
            finished = True
        finally:
            if not finished and self._open and self._epoch == int(epoch):
                self._left_early = True
                warn_at_caller(
                    f"pruner.epoch(loader, {epoch}, ...) was left before its last batch (a break, max_steps, an "
                    f"exception): epoch {epoch}'s forward-only pass and end_epoch did not run, so its losses and "
                    "decision are lost and the ledger lacks it. Fix: let the loop finish the epoch, or call "
                    f"pruner.end_epoch({epoch}) on every rank right after leaving it")
        self._pending_index = None
        self.forward_only_pass(forward_loader, model, forward)
        self.last_log = self.end_epoch(epoch)

    @torch.no_grad()
    def forward_only_pass(self, loader: Any, model: torch.nn.Module | None = None,
                          forward: Callable[[Any], torch.Tensor] | None = None) -> int:
        """Record the losses of this epoch's forward-only samples (nothing when there are none); returns the
        samples this rank processed. loader: batches (batch, int64 [B] indices) drawn from
        `pruner.forward_sampler` (see `d3p.data.pruned_loader`)."""
        if not self.forward_only_indices.size:
            return 0
        if forward is None:
            if model is None:
                raise TypeError("this epoch has a forward-only pass (D3P's recording epoch) but no model: "
                                "pass pruner.epoch(loader, epoch, model) or forward=")
            forward = _default_forward(model, self.per_sample_loss)
        seen = 0
        for batch, indices in loader:
            self.record(indices, forward(batch))
            seen += int(indices.numel())
        return seen

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
            raise RuntimeError("DataPruner.end_epoch called without begin_epoch. Fix: call "
                               "pruner.begin_epoch(epoch) before the epoch's first batch")
        seen, batches = self._same_call_on_every_rank("end_epoch", epoch)
        decision = self._decide(epoch, embeddings)
        # what the model trained: the samples batch_loss saw on every rank, plus the positions a resumed epoch
        # skipped (trained before the preemption); a loop that never calls batch_loss: the sampler's length
        skipped = self.sampler.total_size - len(self.sampler) * self.sampler.num_replicas
        trained = seen + skipped if batches else self.sampler.total_size
        forward_seen = self.forward_sampler.total_size if self._forward_recorded else 0
        if embeddings is not None:
            forward_seen += self.num_samples
        self.recorder = None
        self.trained_counts[self.plan.kept] += 1
        costs = self.ledger.record_epoch(
            epoch,
            samples_trained=trained,
            samples_forward_only=forward_seen,
            optimizer_steps=self._batches if optimizer_steps is None else optimizer_steps,
            epoch_seconds=time.time() - (self._epoch_start if started is None else started),
            data_seconds=data_seconds,
            kept=int(self.plan.kept.size),
        )
        costs.pop("epoch")
        self._open = False
        log = {**costs, "plan_fingerprint": self.fingerprint, **decision}
        if self.log_epochs:
            logger.info(self.epoch_summary(epoch, log))
        return log

    def _decide(self, epoch: int, embeddings: np.ndarray | None) -> dict[str, Any]:
        """The method's end_epoch; its warnings re-issued in the caller's terms at the caller's line."""
        if self._flags:
            return self.strategy.end_epoch(epoch, self.epoch_losses(), embeddings) or {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decision = self.strategy.end_epoch(epoch, self.epoch_losses(), embeddings) or {}
        for w in caught:
            warn_at_caller(in_keywords(str(w.message)), w.category)
        if "d3p_warning" in decision:
            decision["d3p_warning"] = in_keywords(decision["d3p_warning"])
        return decision

    @staticmethod
    def epoch_summary(epoch: int, log: dict[str, Any]) -> str:
        """One line of an epoch's log: kept, the epoch's and the run's prune ratio, compute saved, the fit KS."""
        ks = log.get("d3p_fit_ks")
        fit = "" if ks is None else f", fit KS {ks:.3f}"
        return (f"d3p epoch {epoch}: kept {log['kept']}/{log['kept'] + log['pruned']}, epoch prune ratio "
                f"{log['epoch_prune_ratio']:.3f}, run prune ratio {log['run_prune_ratio']:.3f}, compute saved "
                f"{log['compute_saved']:.3f}{fit}")

    def plot(self, path: str, log: bool = False) -> str:
        """Write the figure of the last D3P decision (`d3p-decide --plot`'s) to `path` (its suffix: the format);
        needs matplotlib. Returns `path`."""
        decision = getattr(self.strategy, "last_decision", None)
        if decision is None:
            raise ValueError(f"no D3P decision to plot: method {self.method!r} has made none yet (D3P decides at "
                             "the end of its decision epochs). Fix: call plot after a decision epoch's end_epoch, "
                             "e.g. when pruner.last_log has 'd3p_support'")
        from d3p.plot import plot_decision

        plot_decision(decision, decision.density, path, log=log)
        return path

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
            raise ValueError(self._speak(
                f"checkpoint was written by --prune_method {state['method']}, this run uses "
                f"{self.strategy.name}. Fix: resume with --prune_method {state['method']}, or use a new --output_dir"
            ))
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(self._speak(
                f"checkpoint's dataset has {state['num_samples']} samples, this one {self.num_samples}. "
                "Fix: resume with the same dataset, or use a new --output_dir"
            ))
        try:
            self.strategy.load_state_dict(state["strategy"])
        except ValueError as err:  # the method's refusal (a changed option), in the caller's terms
            raise ValueError(self._speak(str(err))) from None
        self.ledger.load_state_dict(state["ledger"])
        counts = state.get("trained_counts")  # absent in checkpoints of early versions of this fork
        if counts is None:
            counts = torch.zeros(self.num_samples, dtype=torch.int32)
        self.trained_counts = counts.numpy().astype(np.int32).copy()


def _default_forward(model: torch.nn.Module, per_sample_loss: Callable[[Any, Any], torch.Tensor]
                     ) -> Callable[[Any], torch.Tensor]:
    """batch (inputs, targets) -> per_sample_loss(model(inputs), targets), both moved to the model's device."""
    device = next(model.parameters()).device

    def forward(batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError("the default forward-only step takes batches (inputs, targets). Fix: pass "
                            "forward=lambda batch: per-sample losses [B] to pruner.epoch")
        inputs, targets = (t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)
        return per_sample_loss(model(inputs), targets)

    return forward
