"""The engine core both training engines share: autocast, gradient accumulation, the batched NaN-and-stop
check at host-sync points, and the no-gradient passes (forward-only losses, embeddings, evaluation) that stop
on a signal.

Each engine (engine_pretrain.py, engine_finetune.py) keeps only its forward pass and its loss.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from util.dist import agree_at_sync_point

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
    step) one copy to the host and one all-reduce check them for NaN/inf and agree on a stop request.

    Usage per step: `add(loss)`; then `if sync.due(step): values, stop = sync.check(step)`. `check`
    raises NonFiniteLossError on every rank (naming the epoch, the earliest bad step and its rank) or
    returns this chunk's loss values (float32 [k], from step `first` on) and whether any rank asked to stop.
    """

    def __init__(self, epoch: int, start_step: int, num_steps: int, print_freq: int,
                 stop_requested: StopPoll | None = None):
        self.epoch, self.num_steps, self.print_freq = epoch, num_steps, max(int(print_freq), 1)
        self.stop_requested = stop_requested
        self.pending: list[torch.Tensor] = []
        self.first = start_step  # the step of pending[0]

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach())

    def due(self, step: int) -> bool:
        return len(self.pending) >= self.print_freq or step + 1 == self.num_steps

    def check(self) -> tuple[np.ndarray, int, bool]:
        """-> (loss values float32 [k] of the pending steps, the step of the first one, stop agreed)."""
        values = torch.stack(self.pending).float().cpu().numpy()  # the chunk's one host sync
        bad = np.flatnonzero(~np.isfinite(values))
        wants_stop = self.stop_requested is not None and self.stop_requested()
        local_bad = None if not bad.size else self.first + int(bad[0])
        local_value = float(values[bad[0]]) if bad.size else float("nan")
        stop_all, bad_step, bad_rank, value = agree_at_sync_point(wants_stop, local_bad, self.num_steps, local_value)
        if bad_step is not None:
            raise nonfinite_loss_error(self.epoch, bad_step, self.num_steps, bad_rank, value)
        first = self.first
        self.first += len(self.pending)
        self.pending = []
        return values, first, stop_all


def poll_stop(stop_requested: StopPoll | None, step: int, num_steps: int, print_freq: int) -> bool:
    """In the passes without gradient: every `print_freq` batches, all ranks agree on the stop flag (the
    same collective the training loop uses, so a rank never waits alone). The ranks' loaders must have
    the same length (the pruner's samplers pad to equal shares)."""
    if stop_requested is None or (step + 1) % max(print_freq, 1) or step + 1 == num_steps:
        return False
    return agree_at_sync_point(stop_requested(), None, num_steps)[0]


def stoppable(batches: Iterable, num_steps: int, stop_requested: StopPoll | None, print_freq: int,
              stopped: list[bool]) -> Iterator:
    """Yield `batches`; after every `print_freq`-th one ask all ranks (poll_stop) and end early when they
    agree to stop, recording it in `stopped[0]` (the caller then discards the pass's partial results)."""
    for step, batch in enumerate(batches):
        yield batch
        if poll_stop(stop_requested, step, num_steps, print_freq):
            stopped[0] = True
            return


@contextlib.contextmanager
def training_mode(model: torch.nn.Module, train: bool):
    """Run a block with `model.train(train)`, then restore the mode it had."""
    was = model.training
    model.train(train)
    try:
        yield model
    finally:
        model.train(was)
