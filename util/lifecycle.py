"""The training lifecycle every training script shares, written once: the epoch sequence (train, the passes
without gradient, the method's decision, evaluation, log, checkpoint, stop), the mid-epoch save and the resume.

A script builds a `TrainingRun` subclass and supplies only what differs: its per-sample loss (`batch_losses`), its
extra pass without gradient (`embeddings`, D2's), its evaluation and its log line. Pre-training
(main_pretrain_d3p.Pretraining), fine-tuning and the linear probe (main_finetune.Finetuning) do.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from d3p.distributed import RankDivergenceError
from util import checkpoint as ckpt_util
from util import engine, resume, run, run_log
from util.dist import any_rank, is_main_process
from util.engine import EpochMeters
from util.stop import StopSignals


@dataclasses.dataclass
class TrainingRun:
    """One training run's objects and the hooks a script overrides. Built by the script; driven by `run_epochs`."""
    args: argparse.Namespace
    device: torch.device
    amp_dtype: torch.dtype | None
    input_stats: tuple  # (mean, std): uint8 batches are normalised on the device with these
    pruner: object  # d3p.DataPruner
    train_loader: torch.utils.data.DataLoader
    forward_loader: torch.utils.data.DataLoader
    model: torch.nn.Module = None  # DDP-wrapped when distributed
    model_without_ddp: torch.nn.Module = None
    optimizer: torch.optim.Optimizer = None
    loss_scaler: object = None  # util.amp.ScaledOptimizerStep
    stop: StopSignals = None
    log_writer: object = None

    # ------------------------------------------------------------------------------------------------ hooks
    def batch_losses(self, epoch: int, forward_only: bool = False) -> engine.BatchLosses:
        """The per-sample loss of a batch for `epoch` (the forward-only pass's when `forward_only`)."""
        raise NotImplementedError

    def embeddings(self, epoch: int) -> tuple[np.ndarray | None, bool]:
        """The embedding pass a method needs before its decision (D2) -> (embeddings or None, stopped)."""
        return None, False

    def evaluate(self, epoch: int) -> dict | None:
        """After the decision: the fields evaluation adds to the log line ({} for none), None when a stop ended it."""
        return {}

    def log_line(self, epoch: int, train: dict, pruning_log: dict) -> dict:
        """The epoch's log line before evaluation, from the reduced training statistics and the pruner's fields."""
        raise NotImplementedError

    def after_decision(self, epoch: int) -> None:
        """After the method's decision of `epoch` (pre-training saves a static method's subset)."""

    def checkpoint_extra(self) -> dict:
        """Plain data the script adds to every checkpoint (fine-tuning: the best accuracy)."""
        return {}

    def state(self, epoch: int, **extra) -> dict:
        """resume.run_state of this run (a collective: every rank calls it)."""
        return resume.run_state(self.args, epoch, self.model_without_ddp, self.optimizer, self.loss_scaler,
                                self.pruner, **self.checkpoint_extra(), **extra)


# -------------------------------------------------------------------------------------------- the sequence
def run_epochs(r: TrainingRun, point: resume.ResumePoint | None) -> int | None:
    """Train from `point` (or --start_epoch) to --epochs -> run.EXIT_STOPPED when the ranks agreed to stop (after
    the checkpoint), else None. An epoch whose evaluation a stop interrupted is evaluated and logged first."""
    start = point.start_epoch if point is not None else r.args.start_epoch
    if point is not None and point.pending_log is not None:
        pending = dict(point.pending_log)
        epoch = int(pending["epoch"])
        started = time.time() - float(pending.pop("seconds_before_evaluation"))
        if finish_epoch(r, epoch, pending, started, saved=True) is not None:
            return run.stopped(r.stop, f"stopped by signal in the evaluation of epoch {epoch}")
    for epoch in range(start, r.args.epochs):
        partial = point if point is not None and point.partial is not None and point.partial["epoch"] == epoch \
            else None
        code = train_epoch(r, epoch, partial)
        if code is not None:
            return code
    return None


def train_epoch(r: TrainingRun, epoch: int, point: resume.ResumePoint | None) -> int | None:
    """One epoch: training, the passes without gradient, the method's decision, then `finish_epoch`. Returns
    run.EXIT_STOPPED after saving when the ranks agreed to stop, else None. `point`: the mid-epoch checkpoint of
    this epoch to continue."""
    args, pruner = r.args, r.pruner
    pruner.begin_epoch(epoch)
    start_step, meters, seconds_before = 0, EpochMeters(), 0.0
    if point is not None:
        start_step, meters = resume.resume_partial_epoch(point, pruner)
        seconds_before = float(point.partial["seconds"])
    started = time.time() - seconds_before  # the epoch's time, without the time the job was down
    trained_before = meters.samples
    outcome = engine.train_one_epoch(
        r.model, r.train_loader, r.optimizer, r.loss_scaler, epoch, args, r.batch_losses(epoch), pruner=pruner,
        start_step=start_step, meters=meters, stop_requested=r.stop, log_writer=r.log_writer)
    if outcome.interrupted_at_step is not None:
        save_partial(r, epoch, outcome.interrupted_at_step, meters, meters.samples - trained_before, started)
        return run.stopped(r.stop, f"stopped by signal in epoch {epoch} after step {outcome.interrupted_at_step}")
    # the passes without gradient; a stop during them saves the state from before them (RNG included, no partial
    # records), so the resume replays them whole
    rng_before_passes = ckpt_util.rng_state()
    embeddings, stopped_in_pass = no_grad_passes(r, epoch)
    if stopped_in_pass:
        ckpt_util.set_rng_state(rng_before_passes)
        save_partial(r, epoch, start_step + len(r.train_loader), meters, meters.samples - trained_before, started)
        return run.stopped(r.stop, f"stopped by signal in epoch {epoch} after training, during its "
                                   "forward-only/embedding pass")
    train = meters.reduced()
    pruning_log = pruner.end_epoch(epoch, embeddings, optimizer_steps=train["optimizer_steps"],
                                   data_seconds=meters.data_seconds, started=started)
    r.after_decision(epoch)
    log = {**r.log_line(epoch, train, pruning_log), "batch_min": train["batch_min"], "batch_max": train["batch_max"]}
    return finish_epoch(r, epoch, log, started)


def no_grad_passes(r: TrainingRun, epoch: int) -> tuple[np.ndarray | None, bool]:
    """The method's embedding pass (D2) and the forward-only pass (D3P's pruned samples in recording epochs),
    when the epoch needs them -> (embeddings or None, whether the ranks agreed to stop during them)."""
    embeddings, stopped = r.embeddings(epoch) if r.pruner.needs_embeddings else (None, False)
    if stopped:
        return None, True
    if r.pruner.forward_only_indices.size:
        seen = engine.forward_only_pass(r.model_without_ddp, r.forward_loader, r.batch_losses(epoch, True),
                                        r.pruner, epoch, stop_requested=r.stop, print_freq=r.args.print_freq)
        if seen is None:
            return None, True
    return embeddings, False


def finish_epoch(r: TrainingRun, epoch: int, log: dict, started: float, saved: bool = False) -> int | None:
    """Evaluate, log, checkpoint, stop. A stop during the evaluation saves the epoch with its log line pending
    (the resume evaluates and logs it first). `saved`: the epoch's checkpoint exists (a pending line's resume)."""
    test = r.evaluate(epoch)
    stop_now = test is None or any_rank(r.stop())  # every rank takes the same branch (collectives below)
    save_epoch = resume.is_save_epoch(r.args, epoch)
    save = (save_epoch and not saved) or stop_now
    line = {**log, **(test or {})}
    if test:  # the epoch's time includes its evaluation (the pruner's epoch_seconds ends at the decision)
        line["epoch_seconds"] = time.time() - started
    if save_epoch or stop_now:  # (a pending line's resume has the same weights as the saved epoch: same hashes)
        line["replica_checksums"] = check_replicas(r.model_without_ddp, epoch)
    if test is not None:
        # log first, checkpoint second: a crash in between replays this epoch, and the resume drops this line
        # before writing it again (run_log.rewrite_log_until)
        run_log.append_log(r.args.output_dir, line)
        run_log.write_epoch_tensorboard(r.log_writer, epoch, line, r.pruner.strategy)
    if save:
        extra = {}
        if test is None:  # plain data: the line as JSON would write it, with the epoch's time so far
            extra["pending_log"] = json.loads(json.dumps({**log, "seconds_before_evaluation": time.time() - started}))
        resume.save_epoch_checkpoint(r.args, epoch, r.state(epoch, **extra))
    if stop_now:
        where = "in the evaluation of" if test is None else "after"
        return run.stopped(r.stop, f"stopped by signal {where} epoch {epoch}")
    return None


def save_partial(r: TrainingRun, epoch: int, step: int, meters: EpochMeters, trained_here: int,
                 started: float) -> None:
    """The mid-epoch checkpoint after `step` steps of `epoch` (resume.save_partial_epoch); `trained_here`: the
    samples this rank trained of the epoch in this process (the sampler turns them into global positions)."""
    resume.save_partial_epoch(r.args, epoch, r.state(epoch - 1), step, r.pruner.sampler.samples_done(trained_here),
                              time.time() - started, meters, r.pruner)


def check_replicas(model: torch.nn.Module, epoch: int) -> list[str]:
    """All ranks' weight hashes; stop rather than save diverged replicas (a collective)."""
    checksums = ckpt_util.replica_checksums(model)
    if len(set(checksums)) != 1:
        raise RankDivergenceError(
            f"epoch {epoch}: model replicas differ across ranks ({checksums}); not saving a checkpoint of "
            "diverged weights. Fix: restart from the last checkpoint with --auto_resume")
    return checksums


def load_checkpoint_into(r: TrainingRun, fix: str) -> resume.ResumePoint | None:
    """Resume `r` from the newest checkpoint (--auto_resume) or --resume's -> where to continue, or None."""
    found = resume.find_or_load(r.args)
    if found is None:
        return None
    path, checkpoint = found
    resume.load_weights(r.model_without_ddp, checkpoint, path, fix)
    return resume.restore_run_state(checkpoint, path, r, r.args.prune_method)


def write_summary_and_close(r: TrainingRun, summary: dict) -> None:
    """summary.json (rank 0), then close TensorBoard and restore the signal handlers."""
    run_log.write_summary(r.args.output_dir, summary)
    if r.log_writer is not None:
        r.log_writer.close()
    r.stop.restore()


def output_dir_ready(args) -> None:
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
