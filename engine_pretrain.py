"""One MAE pre-training epoch with per-sample losses, weights and recording; the forward-only pass."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import numpy as np
import torch

import util.lr_sched as lr_sched
from d3p import DataPruner
from d3p.collectives import all_reduce, get_rank, is_dist, to_collective
from util.device_input import DeviceNormalize, Stats
from util.dist import agree_at_sync_point, all_reduce_mean, all_reduce_sum
from util.metrics import MetricLogger


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf: the run stops, checkpoints already written stay intact."""


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _first_nonfinite(step_losses: list[torch.Tensor]) -> tuple[np.ndarray, int | None]:
    """Copy a chunk of step losses to the host (one sync per chunk) -> (values, offset of the first
    non-finite one or None)."""
    values = torch.stack(step_losses).float().cpu().numpy()
    bad = np.flatnonzero(~np.isfinite(values))
    return values, (int(bad[0]) if bad.size else None)


def nonfinite_loss_error(epoch: int, step: int, rank: int, value: float | None = None) -> NonFiniteLossError:
    """The error every rank raises once the ranks agreed that `rank` saw a NaN/inf loss at `step`."""
    seen = f"loss is {value}" if value is not None else "a non-finite loss"
    return NonFiniteLossError(
        f"{seen} at epoch {epoch}, step {step} (seen on rank {rank}; all ranks stopped). Training stopped; the "
        "last checkpoint in --output_dir is intact (nothing was saved after the failure). Fix: lower --blr, use "
        "--precision bf16/fp32 instead of fp16, add --clip_grad, or check the data for broken images; "
        "then restart with --auto_resume"
    )


def accumulation_divisor(step: int, num_steps: int, accum_iter: int) -> int:
    """Micro-batches in the accumulation group of `step`: accum_iter, or fewer in the last, partial
    group of an epoch, which is then stepped with its loss correctly scaled (a mean over its own
    micro-batches) instead of being divided by accum_iter."""
    group_start = step - step % accum_iter
    return min(accum_iter, num_steps - group_start)


def train_one_epoch(
    model: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    loss_scaler,
    log_writer=None,
    args=None,
    pruner: DataPruner | None = None,
    amp_dtype: torch.dtype | None = None,
    start_step: int = 0,
    carried: dict | None = None,
    stop_requested: Callable[[], bool] | None = None,
    input_stats: Stats | None = None,
) -> dict:
    """Train one epoch. Batches are (images, targets, dataset_index).

    input_stats: (mean, std) that normalise uint8 image batches on `device` (DeviceNormalize).
    pruner: the run's DataPruner after `begin_epoch`: weighs each batch's per-sample losses (weights
        on the device, moved once per epoch) and records them (no host sync per step). None: MAE's loss
        (the mean), nothing recorded.
    start_step, carried: resume an epoch a preemption interrupted after `start_step` steps (the
        loader then yields only the remaining batches); `carried` holds that part's statistics.
    stop_requested: polled on every rank at the host-sync points (every `print_freq` steps); the ranks
        agree in one all-reduce that also carries the NaN check (util.dist.agree_at_sync_point), and
        all stop after the same optimizer step (the returned stats then carry `interrupted_at_step`)
        or all raise NonFiniteLossError naming the epoch and step.
    Gradient accumulation: an optimizer step every `accum_iter` micro-batches; the epoch's last,
    partial group is stepped too, with its loss divided by its own size (accumulation_divisor).
    Returns epoch statistics (averaged over ranks): train_loss, lr, grad_norm, optimizer_steps,
    data_seconds, corrupt_replaced.
    """
    model.train(True)
    to_input = DeviceNormalize(input_stats, device)
    metric_logger = MetricLogger()
    accum_iter = args.accum_iter
    print_freq = getattr(args, "print_freq", 20)
    num_steps = start_step + len(data_loader)
    optimizer.zero_grad(set_to_none=True)

    carried = carried or {}
    pending: list[torch.Tensor] = []  # step losses not yet copied to the host
    pending_first = start_step
    loss_total = float(carried.get("loss_total", 0.0))
    loss_steps = int(carried.get("loss_steps", 0))
    optimizer_steps = int(carried.get("optimizer_steps", 0))
    corrupt = 0
    grad_norms: list[torch.Tensor] = []
    lr = optimizer.param_groups[0]["lr"]
    interrupted_at = None

    batches = metric_logger.log_every(data_loader, f"Epoch [{epoch}]")
    for step, (samples, _, index) in enumerate(batches, start=start_step):
        update = (step + 1) % accum_iter == 0 or step + 1 == num_steps
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, step / num_steps + epoch, args)
        samples = to_input(samples)
        valid = index >= 0  # negative: a replaced unreadable image (--skip_corrupt)
        corrupt += int((~valid).sum())

        sync_ctx = model.no_sync() if (not update and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync_ctx:
            with _autocast(device, amp_dtype):
                per_sample, _, _ = model(samples, mask_ratio=args.mask_ratio)
            # the method's weights (a replaced image trains with weight 0); records the losses
            loss = per_sample.float().mean() if pruner is None else pruner.batch_loss(per_sample, index)
            norm = loss_scaler(loss / accumulation_divisor(step, num_steps, accum_iter), optimizer, clip_grad=getattr(args, "clip_grad", None),
                               parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1
            if norm is not None:
                grad_norms.append(norm.detach())
        pending.append(loss.detach())

        if len(pending) == print_freq or step + 1 == num_steps:
            values, bad = _first_nonfinite(pending)
            wants_stop = stop_requested is not None and stop_requested()
            stop_all, bad_step, bad_rank = agree_at_sync_point(
                wants_stop, None if bad is None else pending_first + bad, num_steps)
            if bad_step is not None:
                mine = bad is not None and bad_rank == get_rank()
                raise nonfinite_loss_error(epoch, bad_step, bad_rank, float(values[bad]) if mine else None)
            loss_total += float(values.sum())
            loss_steps += values.size
            metric_logger.update(loss=float(values[-1]), lr=lr)
            if log_writer is not None:
                # MAE's x-axis: epoch_1000x keeps curves of different batch sizes comparable
                for k, v in enumerate(values):
                    epoch_1000x = int(((pending_first + k) / num_steps + epoch) * 1000)
                    log_writer.add_scalar("train_loss", float(v), epoch_1000x)
                log_writer.add_scalar("lr", lr, int((step / num_steps + epoch) * 1000))
            pending, pending_first = [], step + 1
            if stop_all and update and step + 1 < num_steps:
                interrupted_at = step + 1
                break

    grad_norm = float(torch.stack(grad_norms).float().mean().item()) if grad_norms else 0.0
    stats = {
        "interrupted_at_step": interrupted_at,
        "loss_total": loss_total,
        "loss_steps": loss_steps,
        "train_loss": all_reduce_mean(loss_total / max(loss_steps, 1)),
        "lr": lr,
        "grad_norm": all_reduce_mean(grad_norm),
        "optimizer_steps": optimizer_steps,
        "data_seconds": metric_logger.data_seconds,
        "corrupt_replaced": int(all_reduce_sum(corrupt)),
    }
    if log_writer is not None:
        log_writer.add_scalar("grad_norm", grad_norm, (epoch + 1) * 1000)
    return stats


def _poll_stop(stop_requested: Callable[[], bool] | None, step: int, num_steps: int, print_freq: int) -> bool:
    """In the passes without gradient: every `print_freq` batches, all ranks agree on the stop flag
    (the same collective the training loop uses, so a rank never waits alone)."""
    if stop_requested is None or (step + 1) % print_freq or step + 1 == num_steps:
        return False
    return agree_at_sync_point(stop_requested(), None, num_steps)[0]


@torch.no_grad()
def forward_only_pass(
    model: torch.nn.Module,
    data_loader: Iterable,
    device: torch.device,
    epoch: int,
    pruner: DataPruner,
    mask_ratio: float,
    amp_dtype: torch.dtype | None = None,
    input_stats: Stats | None = None,
    stop_requested: Callable[[], bool] | None = None,
    print_freq: int = 20,
) -> int | None:
    """Loss of samples that were not trained this epoch (D3P's pruned set in recording epochs):
    same augmentation and random masking, no gradient. Returns the samples this rank processed, or
    None when the ranks agreed to stop (SIGTERM) before the pass ended: the caller then saves the
    state from before the pass, which a resume replays."""
    model.eval()
    to_input = DeviceNormalize(input_stats, device)
    seen = 0
    num_steps = len(data_loader)
    records = []  # handed to the recorder only when the pass completes: a stopped pass leaves no trace
    for step, (samples, _, index) in enumerate(MetricLogger().log_every(data_loader, f"Forward-only [{epoch}]")):
        samples = to_input(samples)
        with _autocast(device, amp_dtype):
            per_sample, _, _ = model(samples, mask_ratio=mask_ratio)
        records.append((index, per_sample))
        seen += int(index.numel())
        if _poll_stop(stop_requested, step, num_steps, print_freq):
            model.train(True)
            return None
    for index, per_sample in records:
        pruner.record(index, per_sample)
    model.train(True)
    return seen


@torch.no_grad()
def compute_embeddings(
    model: torch.nn.Module, data_loader: Iterable, device: torch.device, num_samples: int,
    amp_dtype: torch.dtype | None = None, input_stats: Stats | None = None,
    stop_requested: Callable[[], bool] | None = None, print_freq: int = 20,
) -> tuple[np.ndarray | None, int]:
    """Mean-pooled unmasked encoder features of every sample -> (float32 [N, D], samples processed here).

    Each rank embeds its share; rows are summed across ranks (each row written by one rank, or
    averaged where padding repeated a sample). A negative index (an unreadable image replaced by
    --skip_corrupt) is dropped, as the loss recorder drops it: its row stays empty. The features are
    None when the ranks agreed to stop (SIGTERM) before the pass ended.
    """
    net = model.module if hasattr(model, "module") else model
    net.eval()
    feats = np.zeros((num_samples, net.pos_embed.shape[-1]), dtype=np.float32)
    counts = np.zeros(num_samples, dtype=np.float32)
    seen = 0
    num_steps = len(data_loader)
    to_input = DeviceNormalize(input_stats, device)
    for step, (samples, _, index) in enumerate(MetricLogger().log_every(data_loader, "Embeddings")):
        samples = to_input(samples)
        with _autocast(device, amp_dtype):
            e = net.embed(samples).float().cpu().numpy()
        idx = index.numpy()
        valid = idx >= 0
        np.add.at(feats, idx[valid], e[valid])
        np.add.at(counts, idx[valid], 1.0)
        seen += idx.size
        if _poll_stop(stop_requested, step, num_steps, print_freq):
            net.train(True)
            return None, seen
    net.train(True)
    if is_dist():
        feats = all_reduce(to_collective(torch.from_numpy(feats))).cpu().numpy()
        counts = all_reduce(to_collective(torch.from_numpy(counts))).cpu().numpy()
    return feats / np.maximum(counts, 1.0)[:, None], seen
