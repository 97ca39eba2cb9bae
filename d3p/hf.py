"""D3P (or any pruning method of d3p) in a Hugging Face `Trainer` (transformers 5.x): a Trainer subclass.

    pruner = d3p.DataPruner(len(train_set), "d3p", epochs=E, loss_fn=d3p.hf.per_sequence_token_loss)
    trainer = d3p.PruningTrainer(model=model, args=TrainingArguments(...), train_dataset=train_set, pruner=pruner)
    trainer.train()                              # or train(resume_from_checkpoint=True): exact, also mid-epoch

What it does, through the Trainer's own loop:
- `get_train_dataloader`: the Trainer's DataLoader settings (batch size, collator, workers) over the training
  set, drawing from `pruner.sampler` (already split across ranks, so it is not handed to accelerate's
  `prepare`, which would split it again); each batch carries its dataset indices (key "d3p_index").
- `compute_loss`: per-sample losses `pruner.loss_fn(logits, labels)` (float [B]; for a causal LM the mean token
  loss of each sequence, `per_sequence_token_loss`), weighed and recorded by `pruner.loss`. The same function
  gives the forward-only pass's losses, so the two passes cannot differ.
- each epoch: `begin_epoch` before the loader draws, the epoch's real (pruned) number of steps, and after its
  last step the forward-only pass and `end_epoch`, before the Trainer's epoch-end save.
- checkpoints: each rank's pruning state (with a partial epoch's recorded losses) beside the Trainer's files,
  `d3p_pruning-rank{R}.pt`; a resume continues the epoch and step it was saved at.

Imported only when used (`d3p.PruningTrainer`): `import d3p` does not import transformers.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from d3p.checkpoints import atomic_save
from d3p.data import _ItemAndIndex
from d3p.integration import DataPruner
from d3p.sampler import BalancedBatchSampler

__all__ = ["PruningTrainer", "per_sequence_token_loss", "INDEX_KEY", "CheckpointSaveError"]


class CheckpointSaveError(RuntimeError):
    """A rank failed to write its part of a checkpoint; raised on every rank, with that rank's error."""

INDEX_KEY = "d3p_index"
STATE_FILE = "d3p_pruning-rank{rank}.pt"


def per_sequence_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal LM: logits [B, T, V], labels int64 [B, T] (-100: not a target) -> float32 [B], the mean
    next-token cross-entropy of each sequence (the model's own loss is the mean over all tokens of the batch)."""
    shifted = labels[:, 1:]
    token = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shifted.flatten(), ignore_index=-100,
                            reduction="none").view_as(shifted)
    counted = (shifted != -100).sum(1)
    return token.sum(1) / counted.clamp(min=1)


class _DictIndexCollate:
    """[(item, index)] * B -> collate_fn(items) with the int64 [B] indices under "d3p_index" (added after the
    user's collator, so that it neither sees nor drops the key)."""

    def __init__(self, collate_fn: Any):
        self.collate_fn = collate_fn

    def __call__(self, pairs: list[tuple[Any, int]]) -> dict[str, Any]:
        batch = self.collate_fn([item for item, _ in pairs])
        if INDEX_KEY in batch:
            raise ValueError(f"the collated batch already has a {INDEX_KEY!r} key")
        batch[INDEX_KEY] = torch.tensor([i for _, i in pairs], dtype=torch.int64)
        return batch


class _EpochEnd(TrainerCallback):
    """The forward-only pass and the decision at the Trainer's on_epoch_end (before its epoch-end save)."""

    def __init__(self, trainer: "PruningTrainer"):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer._end_epoch()


class PruningTrainer(Trainer):
    """A `transformers.Trainer` whose training data is pruned by `pruner` (a `d3p.DataPruner` with `loss_fn`:
    (logits, labels) -> float [B]). Gradient accumulation must be 1 (an epoch's step count changes with
    pruning). The learning-rate schedule counts the steps of the unpruned epochs (as InfoBatch's)."""

    def __init__(self, *args: Any, pruner: DataPruner, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if pruner.loss_fn is None:
            raise TypeError("PruningTrainer needs DataPruner(..., loss_fn=f), f(logits, labels) -> float [B] "
                            "(e.g. d3p.hf.per_sequence_token_loss for a causal LM)")
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("PruningTrainer supports gradient_accumulation_steps=1 only (a pruned epoch's "
                             "step count is not a multiple of it). Fix: raise per_device_train_batch_size")
        self.pruner = pruner
        self.model_accepts_loss_kwargs = False  # our loss is a mean: the Trainer divides by accumulation only
        self._epoch_open = False
        self._resume_state: dict[str, Any] | None = None
        self._train_loader: DataLoader | None = None
        self.add_callback(_EpochEnd(self))

    # ------------------------------------------------------------------ data
    def _loader(self, sampler: Any) -> DataLoader:
        # balanced batches (d3p.sampler.BalancedBatchSampler): every kept sample once, no runt step at the end
        return DataLoader(
            _ItemAndIndex(self.train_dataset), batch_sampler=BalancedBatchSampler(sampler, self._train_batch_size),
            collate_fn=_DictIndexCollate(self.data_collator), num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0)

    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's settings, the pruner's (already rank-split) sampler; not passed to accelerate's
        prepare, which would shard the rank's share again (the Trainer moves each batch to the device)."""
        if self.train_dataset is None:
            raise ValueError("PruningTrainer: training requires a train_dataset")
        if len(self.train_dataset) != self.pruner.num_samples:
            raise ValueError(f"the pruner was built for {self.pruner.num_samples} samples, the train_dataset has "
                             f"{len(self.train_dataset)}")
        self._train_loader = self._loader(self.pruner.sampler)
        return self._train_loader

    def _check_loader(self, train_dataloader: Any) -> None:
        """The loader must draw batches from the pruner's sampler as they are: a plain DataLoader whose
        BalancedBatchSampler reads `pruner.sampler` (accelerate's SkipBatchSampler of a resumed epoch allowed).
        Anything else (accelerate's BatchSamplerShard after `prepare`, a custom sampler) re-splits or replaces it."""
        batch_sampler = getattr(train_dataloader, "batch_sampler", None)
        if type(batch_sampler).__name__ == "SkipBatchSampler":
            batch_sampler = batch_sampler.batch_sampler
        if type(batch_sampler) is not BalancedBatchSampler or batch_sampler.sampler is not self.pruner.sampler:
            inner = getattr(batch_sampler, "sampler", batch_sampler)
            raise RuntimeError(
                "the Trainer's training DataLoader does not draw from DataPruner.sampler as it is (found "
                f"{type(train_dataloader).__name__} with {type(batch_sampler).__name__} over "
                f"{type(inner).__name__}): something replaced or re-split it, and each rank would train the wrong "
                "samples. Fix: do not override get_train_dataloader / pass the loader to accelerator.prepare in a "
                "PruningTrainer subclass (the pruner's sampler is already split across ranks)")

    # ------------------------------------------------------------------ epochs
    def _run_epoch(self, *, epoch: int, train_dataloader: Any, steps_in_epoch: int,
                   num_update_steps_per_epoch: int, **kwargs: Any) -> Any:
        self._check_loader(train_dataloader)
        self.pruner.begin_epoch(epoch)
        self._epoch_open = True
        resume = self._resume_state
        if resume is not None and resume["epoch"] == epoch:
            self.pruner._batches = resume["batches"]  # the steps of the epoch's first part (ledger)
            self.pruner._samples_seen = resume["samples"]  # and this rank's samples trained in it
            if resume["recorded"] is not None:
                self.pruner.carry_over(*resume["recorded"])  # this rank's losses of the epoch's first part
        self._resume_state = None
        steps = len(self.pruner.sampler) and math.ceil(len(self.pruner.sampler) / self._train_batch_size)
        return super()._run_epoch(epoch=epoch, train_dataloader=train_dataloader, steps_in_epoch=steps,
                                  num_update_steps_per_epoch=steps, **kwargs)

    def _end_epoch(self) -> None:
        """After the epoch's last batch (not when training stopped inside it, e.g. at max_steps)."""
        batches = len(self.pruner.sampler) and math.ceil(len(self.pruner.sampler) / self._train_batch_size)
        if not self._epoch_open or self.pruner._batches < batches:
            return
        self._epoch_open = False
        epoch = self.pruner._epoch
        model = self.model
        was_training = model.training
        model.train()  # the training pass's mode
        with torch.no_grad():
            self.pruner.forward_only_pass(self._forward_batches(), forward=lambda inputs: self._per_sample(model,
                                                                                                            inputs))
        model.train(was_training)
        self.pruner.last_log = self.pruner.end_epoch(epoch, optimizer_steps=self.pruner._batches)

    def _forward_batches(self):
        if not self.pruner.forward_only_indices.size:
            return
        for batch in self._loader(self.pruner.forward_sampler):
            indices = batch[INDEX_KEY]
            yield self._prepare_inputs(batch), indices

    # ------------------------------------------------------------------ the loss
    def _per_sample(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """One function for both passes: the model's logits and `pruner.loss_fn` -> float [B]."""
        inputs = dict(inputs)
        inputs.pop(INDEX_KEY, None)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("PruningTrainer needs a 'labels' entry in each batch for the per-sample loss")
        outputs = model(**inputs)
        return self.pruner.per_sample_loss(outputs["logits"], labels)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not model.training:  # evaluation (prediction_step): the plain mean loss, nothing recorded
            per_sample = self._per_sample(model, inputs)
            return (per_sample.mean(), None) if return_outputs else per_sample.mean()
        if INDEX_KEY not in inputs:
            raise ValueError(f"the batch has no {INDEX_KEY!r}: it was not drawn by PruningTrainer's training "
                             "DataLoader. Fix: do not override get_train_dataloader in a PruningTrainer subclass")
        indices = inputs[INDEX_KEY].cpu()
        loss = self.pruner.batch_loss(self._per_sample(model, inputs), indices)
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint and this rank's pruning state (written atomically); then every rank learns
        whether every rank saved. A failed save (rank 0's disk full) stops every rank at once with that rank's
        error, instead of the others training on into a collective that never completes."""
        error = None
        try:
            super()._save_checkpoint(model, trial)
            self._save_pruning_state(trial)
        except Exception as err:  # noqa: BLE001 - every failure of a save is shared with the other ranks
            error = err
        failed = self._failed_saves(error)
        if failed:
            rank, message = failed[0]
            raise CheckpointSaveError(
                f"rank {rank} could not save checkpoint-{self.state.global_step}: {message}. Every rank stops "
                "here. Fix: free or change the output directory (TrainingArguments(output_dir=...)), then resume "
                "with trainer.train(resume_from_checkpoint=True)") from error

    def _failed_saves(self, error: BaseException | None) -> list[tuple[int, str]]:
        """(rank, its error) of every rank whose save failed: one all-gather of a short string per save."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
                torch.distributed.get_world_size() == 1:
            return [] if mine is None else [(0, mine)]
        gathered: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        return [(rank, message) for rank, message in enumerate(gathered) if message is not None]

    def _save_pruning_state(self, trial: Any) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)  # rank 0 makes it with the model's files; the others need not wait
        recorded = None
        if self._epoch_open and self.pruner.recorder is not None:
            recorded = self.pruner.recorder.totals()  # this rank's losses so far (plain float64/int32 arrays)
        state = {
            "pruner": self.pruner.state_dict(),
            "epoch": self.pruner._epoch if self._epoch_open else
            (0 if self.pruner._epoch is None else self.pruner._epoch + 1),
            "batches": self.pruner._batches if self._epoch_open else 0,
            "samples": self.pruner._samples_seen if self._epoch_open else 0,  # this rank's, for the ledger
            "world_size": self.pruner.sampler.num_replicas,
            "recorded": None if recorded is None else [torch.from_numpy(recorded[0]), torch.from_numpy(recorded[1])],
        }
        atomic_save(state, os.path.join(folder, STATE_FILE.format(rank=self.args.process_index)))

    def _init_training_state(self, max_steps: int, num_update_steps_per_epoch: int, num_train_epochs: int,
                             resume_from_checkpoint: Any, trial: Any) -> tuple[int, int]:
        epochs_trained, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch,
                                                             num_train_epochs, resume_from_checkpoint, trial)
        if resume_from_checkpoint is None:
            return epochs_trained, steps
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        path = os.path.join(resume_from_checkpoint, STATE_FILE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by a PruningTrainer "
                                    "(or by fewer ranks). Fix: resume from a PruningTrainer checkpoint with the "
                                    "same number of processes")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["world_size"] != self.args.world_size:
            raise ValueError(f"the checkpoint was written by {state['world_size']} ranks, this run has "
                             f"{self.args.world_size}. Fix: resume with the same number of processes")
        self.pruner.load_state_dict(state["pruner"])
        recorded = state["recorded"]
        self._resume_state = {"epoch": state["epoch"], "batches": int(state["batches"]),
                              # absent in checkpoints of earlier versions: full batches
                              "samples": int(state.get("samples", int(state["batches"]) * self._train_batch_size)),
                              "recorded": None if recorded is None else (recorded[0].numpy(),
                                                                         recorded[1].numpy().astype(np.int32))}
        return int(state["epoch"]), int(state["batches"])
