"""One MAE pre-training epoch with per-sample losses, weights and recording; the forward-only pass."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import numpy as np
import torch

import util.lr_sched as lr_sched
from d3p import DataPruner
from util.dist import all_reduce_mean, all_reduce_sum, any_rank, collective_device, is_dist
from util.metrics import MetricLogger


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf: the run stops, checkpoints already written stay intact."""


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_finite(step_losses: list[torch.Tensor], first_step: int, epoch: int) -> np.ndarray:
    """Copy a chunk of step losses to the host (one sync per chunk) and stop on a non-finite one."""
    values = torch.stack(step_losses).float().cpu().numpy()
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        step = first_step + int(bad[0])
        raise NonFiniteLossError(
            f"loss is {values[bad[0]]} at epoch {epoch}, step {step}. Training stopped; the last checkpoint "
            "in --output_dir is intact (nothing was saved after the failure). Fix: lower --blr, use "
            "--precision bf16/fp32 instead of fp16, add --clip_grad, or check the data for broken images; "
            "then restart with --auto_resume"
        )
    return values


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
) -> dict:
    """Train one epoch. Batches are (images, targets, dataset_index).

    pruner: the run's DataPruner after `begin_epoch`: weighs each batch's per-sample losses and records
        them (no host sync per step). None: MAE's loss (the mean), nothing recorded.
    start_step, carried: resume an epoch a preemption interrupted after `start_step` steps (the
        loader then yields only the remaining batches); `carried` holds that part's statistics.
    stop_requested: polled on every rank at the host-sync points that end an optimizer step; the
        ranks agree (one scalar all-reduce) and all stop after the same step. The returned stats
        then carry `interrupted_at_step`.
    Returns epoch statistics (averaged over ranks): train_loss, lr, grad_norm, optimizer_steps,
    data_seconds, corrupt_replaced.
    """
    model.train(True)
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
        samples = samples.to(device, non_blocking=True)
        valid = index >= 0  # negative: a replaced unreadable image (--skip_corrupt)
        corrupt += int((~valid).sum())

        sync_ctx = model.no_sync() if (not update and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with sync_ctx:
            with _autocast(device, amp_dtype):
                per_sample, _, _ = model(samples, mask_ratio=args.mask_ratio)
            # the method's weights (a replaced image trains with weight 0); records the losses
            loss = per_sample.float().mean() if pruner is None else pruner.batch_loss(per_sample, index)
            norm = loss_scaler(loss / accum_iter, optimizer, clip_grad=getattr(args, "clip_grad", None),
                               parameters=model.parameters(), update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1
            if norm is not None:
                grad_norms.append(norm.detach())
        pending.append(loss.detach())

        if len(pending) == print_freq or step + 1 == num_steps:
            values = _check_finite(pending, pending_first, epoch)
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
            if stop_requested is not None and update and step + 1 < num_steps and any_rank(stop_requested()):
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


@torch.no_grad()
def forward_only_pass(
    model: torch.nn.Module,
    data_loader: Iterable,
    device: torch.device,
    epoch: int,
    pruner: DataPruner,
    mask_ratio: float,
    amp_dtype: torch.dtype | None = None,
) -> int:
    """Loss of samples that were not trained this epoch (D3P's pruned set in recording epochs):
    same augmentation and random masking, no gradient. Returns the samples this rank processed."""
    model.eval()
    seen = 0
    for samples, _, index in MetricLogger().log_every(data_loader, f"Forward-only [{epoch}]"):
        samples = samples.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            per_sample, _, _ = model(samples, mask_ratio=mask_ratio)
        pruner.record(index, per_sample)
        seen += int(index.numel())
    model.train(True)
    return seen


@torch.no_grad()
def compute_embeddings(
    model: torch.nn.Module, data_loader: Iterable, device: torch.device, num_samples: int,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, int]:
    """Mean-pooled unmasked encoder features of every sample -> (float32 [N, D], samples processed here).

    Each rank embeds its share; rows are summed across ranks (each row written by one rank, or
    averaged where padding repeated a sample).
    """
    import torch.distributed as dist

    net = model.module if hasattr(model, "module") else model
    net.eval()
    feats = np.zeros((num_samples, net.pos_embed.shape[-1]), dtype=np.float32)
    counts = np.zeros(num_samples, dtype=np.float32)
    seen = 0
    for samples, _, index in MetricLogger().log_every(data_loader, "Embeddings"):
        samples = samples.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            e = net.embed(samples).float().cpu().numpy()
        idx = index.numpy()
        np.add.at(feats, idx, e)
        np.add.at(counts, idx, 1.0)
        seen += idx.size
    net.train(True)
    if is_dist():
        f, c = torch.from_numpy(feats).to(collective_device()), torch.from_numpy(counts).to(collective_device())
        dist.all_reduce(f)
        dist.all_reduce(c)
        feats, counts = f.cpu().numpy(), c.cpu().numpy()
    return feats / np.maximum(counts, 1.0)[:, None], seen

