"""The one training loop (`train_one_epoch`) and its parts: autocast, gradient accumulation, the epoch's
statistics as running sums (`EpochMeters`), the batched NaN check at host-sync points, the stop agreement at
optimizer-step boundaries, and the no-gradient passes (forward-only losses, embeddings) that stop on a signal.

Each engine (engine_pretrain.py, engine_finetune.py) supplies only its per-sample loss: MAE's reconstruction
loss, or mixup and the criterion. The epoch sequence around the loop is util/lifecycle.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

import util.lr_sched as lr_sched
from d3p.collectives import all_reduce, is_dist, to_collective
from util.dist import agree_at_sync_point
from util.metrics import MetricLogger
from util.stop import StopAgreement

StopPoll = Callable[[], bool]


class NonFiniteLossError(RuntimeError, FloatingPointError):
    """The training loss became NaN/inf: the run stops, checkpoints already written stay intact.

    A FloatingPointError too: MAE's fine-tuning engine raised that, and callers may catch it by that name."""


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast on `device` with `dtype`; no context at all for fp32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def accumulation_divisor(step: int, num_steps: int, accum_iter: int) -> int:
    """Micro-batches in the accumulation group of `step`: accum_iter, or fewer in the last, partial
    group of an epoch, which is then stepped with its loss correctly scaled (a mean over its own
    micro-batches) instead of being divided by accum_iter."""
    group_start = step - step % accum_iter
    return min(accum_iter, num_steps - group_start)


def no_sync_unless(model: torch.nn.Module, update: bool):
    """DDP's no_sync() for an accumulation micro-batch that does not step (no gradient all-reduce)."""
    if update or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def nonfinite_loss_error(epoch: int, step: int, num_steps: int, rank: int, value: float) -> NonFiniteLossError:
    """The error every rank raises once the ranks agreed that `rank` saw the loss `value` (nan, inf, -inf) at
    `step` (0-based, as MAE counts epochs) of `num_steps`: the same message on every rank."""
    return NonFiniteLossError(
        f"non-finite training loss ({value}) at epoch {epoch}, step {step} (of steps 0-{num_steps - 1}; seen on "
        f"rank {rank}; all ranks stopped). Training stopped; the last checkpoint in --output_dir is intact (nothing "
        "was saved after the failure). Fix: lower --blr, use --precision bf16/fp32 instead of fp16, add "
        "--clip_grad, or check the data for broken images; then restart with --auto_resume"
    )


class SyncPoint:
    """Step losses stay on the device between host-sync points; every `print_freq` steps (and at the last
    step, or where the ranks agreed to stop) one copy to the host and one all-reduce check them for NaN/inf.

    Usage per step: `add(loss)`; then `if sync.due(step): values, first = sync.check()`. `check` raises
    NonFiniteLossError on every rank (naming the epoch, the earliest bad step and its rank) or returns this
    chunk's loss values (float32 [k]) and the step of the first one. A stop is agreed elsewhere (StopAgreement,
    at optimizer-step boundaries), not here: it does not wait for this point.
    """

    def __init__(self, epoch: int, start_step: int, num_steps: int, print_freq: int):
        self.epoch, self.num_steps, self.print_freq = epoch, num_steps, max(int(print_freq), 1)
        self.pending: list[torch.Tensor] = []
        self.first = start_step  # the step of pending[0]

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach())

    def due(self, step: int) -> bool:
        return len(self.pending) >= self.print_freq or step + 1 == self.num_steps

    def check(self) -> tuple[np.ndarray, int]:
        """-> (loss values float32 [k] of the pending steps, the step of the first one)."""
        values = torch.stack(self.pending).float().cpu().numpy()  # the chunk's one host sync
        bad = np.flatnonzero(~np.isfinite(values))
        local_bad = None if not bad.size else self.first + int(bad[0])
        local_value = float(values[bad[0]]) if bad.size else float("nan")
        _, bad_step, bad_rank, value = agree_at_sync_point(False, local_bad, self.num_steps, local_value)
        if bad_step is not None:
            raise nonfinite_loss_error(self.epoch, bad_step, self.num_steps, bad_rank, value)
        first = self.first
        self.first += len(self.pending)
        self.pending = []
        return values, first


def stop_agreement(stop: StopPoll | StopAgreement | None) -> StopAgreement | None:
    """The StopAgreement of `stop` (a StopSignals or any callable -> bool), begun for a new phase."""
    if stop is None:
        return None
    agreement = stop if isinstance(stop, StopAgreement) else StopAgreement(stop)
    agreement.begin()
    return agreement


def stoppable(batches: Iterable, num_steps: int, stop_requested: StopPoll | StopAgreement | None, print_freq: int,
              stopped: list[bool]) -> Iterator:
    """Yield `batches` (a pass without gradient); each batch is a boundary of the ranks' stop agreement
    (StopAgreement: no wait per batch), and the pass ends early when they agree to stop, recording it in
    `stopped[0]` (the caller then discards the pass's partial results). The ranks' loaders must have the same
    length (the pruner's samplers pad to equal shares). `print_freq` is no longer used here: a stop does not
    wait for a sync point."""
    agreement = stop_agreement(stop_requested)
    for batch in batches:
        yield batch
        if agreement is not None and agreement.at_boundary():
            stopped[0] = True
            break
    if agreement is not None:
        agreement.end()  # all ranks drain the same works; a stop agreed after the last batch is the caller's


@contextlib.contextmanager
def training_mode(model: torch.nn.Module, train: bool):
    """Run a block with `model.train(train)`, then restore the mode it had."""
    was = model.training
    model.train(train)
    try:
        yield model
    finally:
        model.train(was)


# ----------------------------------------------------------------------------------------- the epoch's statistics
@dataclasses.dataclass
class EpochMeters:
    """This rank's running sums of an epoch's training statistics.

    Every value is added one at a time, in step order, in float64: an epoch stopped at any step and resumed adds
    the same values in the same order as the uninterrupted epoch, so its log line is the same (the chunks of the
    host-sync points never regroup a sum). A mid-epoch checkpoint stores every rank's meters (`state_dict`);
    the resumed rank continues its own (`load_state_dict`), or rank 0 continues all of them on another world
    size (`merged`). `reduced` sums them over the ranks once, at the epoch's end."""
    loss_sum: float = 0.0
    loss_count: int = 0
    lr_sum: float = 0.0
    last_lr: float = 0.0
    grad_norm_sum: float = 0.0
    grad_norm_count: int = 0  # finite norms only: an fp16 overflow step is skipped by the scaler, not logged
    steps: int = 0  # micro-steps (batches) trained this epoch
    optimizer_steps: int = 0
    samples: int = 0  # samples trained by this rank (padding included)
    corrupt: int = 0  # replaced unreadable images (--skip_corrupt)
    batch_min: int = 0  # this rank's smallest and largest batch (0: none yet); every rank has the same sizes
    batch_max: int = 0
    data_seconds: float = 0.0  # wall time waiting for the loader (not part of the log's exact fields)

    _SUMMED = ("loss_sum", "loss_count", "lr_sum", "grad_norm_sum", "grad_norm_count", "optimizer_steps",
               "samples", "corrupt")

    def add_step(self, loss: float, lr: float) -> None:
        self.loss_sum += float(loss)
        self.loss_count += 1
        self.lr_sum += float(lr)
        self.last_lr = float(lr)

    def add_batch(self, size: int) -> None:
        self.samples += size
        self.batch_min = size if not self.batch_min else min(self.batch_min, size)
        self.batch_max = max(self.batch_max, size)

    def add_grad_norm(self, norm: float) -> None:
        if math.isfinite(norm):
            self.grad_norm_sum += float(norm)
            self.grad_norm_count += 1

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for field in dataclasses.fields(self):
            if field.name in state:
                setattr(self, field.name, type(getattr(self, field.name))(state[field.name]))

    @classmethod
    def merged(cls, states: list[dict]) -> "EpochMeters":
        """All ranks' meters as one (a resume on another world size: rank 0 carries the interrupted part)."""
        out = cls()
        for state in states:
            part = cls()
            part.load_state_dict(state)
            for name in cls._SUMMED:
                setattr(out, name, getattr(out, name) + getattr(part, name))
            out.steps, out.last_lr = max(out.steps, part.steps), part.last_lr or out.last_lr
            out.batch_max = max(out.batch_max, part.batch_max)
            out.batch_min = min(b for b in (out.batch_min, part.batch_min) if b) if part.batch_min else out.batch_min
            out.data_seconds += part.data_seconds
        return out

    def reduced(self) -> dict:
        """The epoch's statistics over all ranks (one all-reduce): loss, lr (mean over the steps), last_lr,
        grad_norm (mean of the finite norms), optimizer_steps (this rank's), samples, corrupt_replaced, and this
        rank's smallest and largest batch."""
        sums = torch.tensor([float(getattr(self, name)) for name in self._SUMMED], dtype=torch.float64)
        if is_dist():
            sums = all_reduce(to_collective(sums)).cpu()
        total = dict(zip(self._SUMMED, sums.tolist()))
        return {
            "loss": total["loss_sum"] / total["loss_count"] if total["loss_count"] else float("nan"),
            "lr": total["lr_sum"] / total["loss_count"] if total["loss_count"] else self.last_lr,
            "last_lr": self.last_lr,
            "grad_norm": total["grad_norm_sum"] / total["grad_norm_count"] if total["grad_norm_count"] else 0.0,
            "optimizer_steps": self.optimizer_steps,
            "samples": int(total["samples"]),
            "corrupt_replaced": int(total["corrupt"]),
            "batch_min": self.batch_min,
            "batch_max": self.batch_max,
        }


# -------------------------------------------------------------------------------------------- the one loop
BatchLosses = Callable[[tuple, int], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclasses.dataclass
class EpochOutcome:
    """What `train_one_epoch` returns: the meters (carried ones included) and, when the ranks agreed to stop,
    the step the epoch continues at (None: the epoch is complete)."""
    meters: EpochMeters
    interrupted_at_step: int | None = None


def train_one_epoch(model: torch.nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer, loss_scaler,
                    epoch: int, args, batch_losses: BatchLosses, *, pruner=None, start_step: int = 0,
                    meters: EpochMeters | None = None, stop_requested: StopPoll | None = None,
                    log_writer=None) -> EpochOutcome:
    """Train one epoch (0-based, as MAE counts): the one loop of pre-training, fine-tuning and the linear probe.

    batch_losses(batch, step) -> (per-sample losses float [B], dataset indices int64 [B] or None): the engine's
        forward pass under autocast (MAE's reconstruction loss; mixup and the criterion).
    pruner: the run's d3p.DataPruner after `begin_epoch`: weighs the per-sample losses and records them (no host
        sync per step). None: the batch loss is the mean.
    start_step, meters: resume an epoch a stop interrupted after `start_step` steps (the loader then yields only
        the remaining batches); `meters` holds that part's statistics of this rank.
    stop_requested: a StopSignals (or any callable -> bool) polled after every optimizer step through a
        StopAgreement: the ranks agree, without a device sync, to stop after the optimizer step that follows the
        one at which a flag was first seen, the same on every rank; the NaN check then runs on the steps so far.
    Gradient accumulation (args.accum_iter): the epoch's last, partial group is stepped too, its loss divided by
    its own size (accumulation_divisor). The learning rate follows util.lr_sched per accumulation group.
    """
    model.train(True)
    meters = meters if meters is not None else EpochMeters()
    accum_iter = max(int(getattr(args, "accum_iter", 1)), 1)
    num_steps = start_step + len(data_loader)
    if num_steps == 0:
        raise RuntimeError(f"epoch {epoch}: the training loader is empty (dataset smaller than one batch with "
                           "drop_last). Fix: lower --batch_size")
    params = [p for p in model.parameters() if p.requires_grad]
    sync = SyncPoint(epoch, start_step, num_steps, getattr(args, "print_freq", 20))
    agreement = stop_agreement(stop_requested)
    timer = MetricLogger()
    lrs: list[float] = []  # the steps' lr since the last sync point
    norms: list[torch.Tensor] = []  # the updates' gradient norms since the last sync point, on the device
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(timer.log_every(data_loader, f"Epoch [{epoch}]"), start=start_step):
        update = (step + 1) % accum_iter == 0 or step + 1 == num_steps
        if step % accum_iter == 0:  # per accumulation group, at the fractional epoch (MAE)
            lr_sched.adjust_learning_rate(optimizer, step / num_steps + epoch, args)
        with no_sync_unless(model, update):
            per_sample, index = batch_losses(batch, step)
            loss = per_sample.float().mean() if pruner is None else pruner.batch_loss(per_sample, index)
            norm = loss_scaler(loss / accumulation_divisor(step, num_steps, accum_iter), optimizer,
                               clip_grad=getattr(args, "clip_grad", None), parameters=params, update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
            meters.optimizer_steps += 1
            if norm is not None:
                norms.append(norm.detach().float().reshape(()))
        meters.steps += 1
        if index is not None:
            meters.add_batch(int(index.numel()))
            meters.corrupt += int((index < 0).sum())  # negative: a replaced unreadable image (--skip_corrupt)
        lrs.append(max(group["lr"] for group in optimizer.param_groups))
        sync.add(loss)
        # every rank reaches the same boundaries (equal loader lengths), so all agree on the same one
        stop_here = update and agreement is not None and step + 1 < num_steps and agreement.at_boundary()
        if sync.due(step) or stop_here:  # the NaN check also covers the steps before a stop
            values, first = sync.check()
            _log_chunk(meters, values, lrs, norms, log_writer, first, num_steps, epoch, accum_iter)
            lrs, norms = [], []
        if stop_here:
            agreement.end()
            meters.data_seconds += timer.data_seconds
            return EpochOutcome(meters, interrupted_at_step=step + 1)
    if agreement is not None:
        agreement.end()  # a stop agreed at the epoch's end: the caller stops after the epoch (util.dist.any_rank)
    meters.data_seconds += timer.data_seconds
    return EpochOutcome(meters)


def _log_chunk(meters: EpochMeters, values: np.ndarray, lrs: list[float], norms: list[torch.Tensor], log_writer,
               first: int, num_steps: int, epoch: int, accum_iter: int) -> None:
    """The meters and TensorBoard points of the steps since the last sync point (their losses already on the host).
    x-axis: MAE's epoch_1000x (curves of different batch sizes stay comparable); rank 0's own values."""
    for value, lr in zip(values.tolist(), lrs):
        meters.add_step(value, lr)
    if norms:
        for norm in torch.stack(norms).cpu().tolist():
            meters.add_grad_norm(norm)
    if log_writer is None:
        return
    for k, (value, lr) in enumerate(zip(values.tolist(), lrs)):
        step = first + k
        epoch_1000x = int((step / num_steps + epoch) * 1000)
        log_writer.add_scalar("train_loss", value, epoch_1000x)
        if (step + 1) % accum_iter == 0 or step + 1 == num_steps:
            log_writer.add_scalar("lr", lr, epoch_1000x)


@torch.no_grad()
def forward_only_pass(model: torch.nn.Module, data_loader: Iterable, batch_losses: BatchLosses, pruner, epoch: int,
                      stop_requested: StopPoll | None = None, print_freq: int = 20) -> int | None:
    """Per-sample losses of the samples not trained this epoch (D3P's pruned set in recording epochs), recorded in
    the pruner: the same augmentation and loss as training (`batch_losses`), no gradient.

    The model runs in training mode (drop path, dropout), as the kept samples' losses were recorded: both sets
    come from one distribution; in eval mode the pruned samples would look easier and stay pruned (the published
    D3P code records them with the model as it trains). Returns the samples this rank processed, or None when the
    ranks agreed to stop before the pass ended: nothing is recorded then, and the caller saves the state from
    before the pass, which a resume replays."""
    seen, stopped, records = 0, [False], []
    batches = MetricLogger().log_every(data_loader, f"Forward-only [{epoch}]")
    with training_mode(model, True):
        for step, batch in enumerate(stoppable(batches, len(data_loader), stop_requested, print_freq, stopped)):
            per_sample, index = batch_losses(batch, step)
            records.append((index, per_sample))
            seen += int(index.numel())
    if stopped[0]:
        return None
    for index, per_sample in records:
        pruner.record(index, per_sample)
    return seen
