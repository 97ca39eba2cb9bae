"""D3P (or any pruning method of d3p) in a Lightning 2.x training run: one callback.

    pruner = d3p.DataPruner(len(train_set), "d3p", epochs=E, loss_fn=nn.CrossEntropyLoss(reduction="none"))

    class Classifier(L.LightningModule):                        # the module's own code, two lines changed:
        def training_step(self, batch, batch_idx):
            x, y, index = batch                                 # items carry their index (d3p.IndexedDataset)
            return pruner.loss(self(x), y, index)               # loss_fn per sample, weighted, recorded
        def train_dataloader(self):
            return DataLoader(d3p.IndexedDataset(train_set), batch_size=64, sampler=pruner.sampler)

    trainer = L.Trainer(max_epochs=E, callbacks=[d3p.PruningCallback(pruner)], use_distributed_sampler=False)

The callback begins each epoch's plan before the loader draws from the sampler, runs the forward-only pass
(D3P's recording epochs) and `end_epoch` right after the epoch's last training batch (so a checkpoint saved at
validation or epoch end holds the decision), and puts the pruner's state into Lightning's checkpoint (resume
with `trainer.fit(..., ckpt_path=...)` is exact at epoch ends). Under DDP, Lightning replaces a custom sampler
by its own DistributedSamplerWrapper unless `use_distributed_sampler=False`: the callback refuses to train
on a replaced sampler.

Imported only when used (`d3p.PruningCallback`): `import d3p` does not import lightning.
"""
from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from d3p.integration import DataPruner

__all__ = ["PruningCallback", "METRICS"]

# logged as d3p/<key> at each epoch's end (docs/library.md, "The d3p metrics")
METRICS = ("kept", "epoch_prune_ratio", "run_prune_ratio", "compute_saved")


def _loaders(obj: Any) -> list[DataLoader]:
    """The DataLoaders of a (nested) train_dataloader collection."""
    if isinstance(obj, DataLoader):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [dl for o in obj for dl in _loaders(o)]
    return []


def _draws_from(loader: DataLoader, sampler: Any) -> bool:
    return loader.sampler is sampler or getattr(loader.batch_sampler, "sampler", None) is sampler


class PruningCallback(pl.Callback):
    """Runs `pruner`'s epochs inside Lightning's fit loop; its state rides in Lightning's checkpoint.

    forward: (pl_module, batch on the device) -> float [B] per-sample losses of the forward-only pass;
        default: batches (x, y, index) -> `pruner.per_sample_loss(pl_module(x), y)`, the module in the
        training pass's mode, without gradient. Give it when training_step computes its outputs otherwise.
    """

    def __init__(self, pruner: DataPruner, forward: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None):
        self.pruner = pruner
        self.forward = forward
        self._forward_loader: DataLoader | None = None
        self._ended = True  # the current epoch's end_epoch has run (or no epoch has begun)

    @property
    def state_key(self) -> str:
        return "d3p.PruningCallback"

    # ------------------------------------------------------------------ the epoch
    def _begin(self, epoch: int) -> None:
        if self.pruner._epoch != epoch or self.pruner.plan is None:
            self.pruner.begin_epoch(epoch)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the fit loop's first `iter(loader)` comes before its first on_train_epoch_start: the plan must exist
        self._begin(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = _loaders(trainer.train_dataloader)
        if not any(_draws_from(dl, self.pruner.sampler) for dl in loaders):
            found = ", ".join(type(dl.sampler).__name__ for dl in loaders) or "none"
            raise RuntimeError(
                f"the training DataLoader does not draw from DataPruner.sampler (its sampler: {found}). Lightning "
                "replaces a custom sampler under a distributed strategy unless told not to, and the pruned "
                "samples would then be trained anyway. Fix: L.Trainer(..., use_distributed_sampler=False) and "
                "train_dataloader() returning DataLoader(d3p.IndexedDataset(train_set), sampler=pruner.sampler)")
        for dl in loaders:
            if _draws_from(dl, self.pruner.sampler) and len(dl.dataset) != self.pruner.num_samples:
                raise ValueError(
                    f"the training DataLoader's dataset has {len(dl.dataset)} samples, but the pruner was built for "
                    f"{self.pruner.num_samples}. Fix: d3p.DataPruner(len(train_set), ...) over the same dataset")
        self._begin(trainer.current_epoch)
        self._ended = False
        self._follow_pruned_epoch(trainer)

    @staticmethod
    def _follow_pruned_epoch(trainer: pl.Trainer) -> None:
        """Lightning counts the training batches once, from the first (unpruned) loader; validation (and with
        it ModelCheckpoint(monitor=...), EarlyStopping, plateau schedulers) runs when that count is reached, and
        the progress bar shows it. Recount them from this epoch's pruned loader."""
        loop = trainer.fit_loop
        combined = loop._combined_loader
        if combined is None or len(combined.flattened) != 1:  # several train loaders: Lightning's count stays
            return
        limit = combined.limits[0] if combined.limits else float("inf")
        batches = min(len(combined.flattened[0]), limit)
        if batches == loop.max_batches:
            return
        loop.max_batches = batches
        interval = trainer.val_check_interval
        if isinstance(interval, float) and getattr(trainer, "_val_check_time_interval", None) is None \
                and trainer.val_check_batch not in (None, float("inf")):
            trainer.val_check_batch = max(1, int(batches * interval))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == 0 and not self.pruner.sampler.iterated_current:
            raise RuntimeError(
                f"epoch {trainer.current_epoch}: the training DataLoader began drawing before the epoch's plan "
                "(its iteration started before on_train_epoch_start). Fix: do not iterate the train dataloader "
                "outside the fit loop, and keep reload_dataloaders_every_n_epochs=0")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self._end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module)  # once: a no-op when the last batch already ended the epoch

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ended:
            return
        self._ended = True
        self.pruner.forward_only_pass(self._forward_batches(trainer), forward=self._forward_fn(pl_module))
        log = self.pruner.end_epoch(trainer.current_epoch)
        self.pruner.last_log = log
        # every rank holds the same (global) values: "max" across ranks is each of them, exactly, and a synced
        # metric raises no sync_dist warning under DDP
        for key in METRICS:
            pl_module.log(f"d3p/{key}", float(log[key]), on_step=False, on_epoch=True, sync_dist=True,
                          reduce_fx="max")

    # ------------------------------------------------------------------ the forward-only pass
    def _forward_batches(self, trainer: pl.Trainer):
        """(batch on the device, int64 [B] indices) over `pruner.forward_sampler`, with the train loader's
        dataset, batch size and collate_fn."""
        if not self.pruner.forward_only_indices.size:
            return iter(())
        train = next(dl for dl in _loaders(trainer.train_dataloader) if _draws_from(dl, self.pruner.sampler))
        if self._forward_loader is None or self._forward_loader.dataset is not train.dataset:
            self._forward_loader = DataLoader(train.dataset, batch_size=train.batch_size,
                                              sampler=self.pruner.forward_sampler, collate_fn=train.collate_fn,
                                              num_workers=train.num_workers, pin_memory=train.pin_memory)
        for batch in self._forward_loader:
            batch = trainer.strategy.batch_to_device(batch)
            yield batch, _index_of(batch).cpu()

    def _forward_fn(self, pl_module: pl.LightningModule) -> Callable[[Any], torch.Tensor]:
        if self.forward is not None:
            return lambda batch: self.forward(pl_module, batch)

        def forward(batch: Any) -> torch.Tensor:
            if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                raise TypeError("the default forward-only step takes batches (x, y, index) from "
                                "d3p.IndexedDataset. Fix: PruningCallback(pruner, forward=lambda module, batch: "
                                "per-sample losses [B])")
            return self.pruner.per_sample_loss(pl_module(batch[0]), batch[1])

        return forward

    # ------------------------------------------------------------------ the checkpoint
    def state_dict(self) -> dict[str, Any]:
        # an epoch begun but not ended: Lightning restarts its data from the start, which pruning cannot replay
        return {"pruner": self.pruner.state_dict(), "mid_epoch": not self._ended}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mid_epoch"):
            raise ValueError(
                "this checkpoint was written in the middle of a training epoch (e.g. ModelCheckpoint("
                "every_n_train_steps=...)); the pruning state of a partial epoch cannot be resumed exactly. "
                "Fix: resume from a checkpoint saved at an epoch's end (ModelCheckpoint(save_on_train_epoch_end="
                "True) or after validation)")
        self.pruner.load_state_dict(state_dict["pruner"])


def _index_of(batch: Any) -> torch.Tensor:
    """The int64 [B] dataset indices of an IndexedDataset batch (last tuple element or the "index" key)."""
    if isinstance(batch, dict):
        return batch["index"]
    return batch[-1]
