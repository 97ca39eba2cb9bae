"""Fine-tuning / linear-probing engine: one training epoch and the evaluation loop (after MAE's engine_finetune.py).

Train items are (image, target, dataset_index) (index optional without a pruner), val items (image, target[, ...]).
The criterion gives per-sample losses; `d3p.DataPruner.batch_loss` turns them into the batch loss (the method's
weights) and records them. Training statistics are per rank during the epoch and
reduced across ranks once at its end; evaluation sums correct counts and totals across ranks, so the accuracy is
exact whenever the ranks' val loaders partition the val set (see main_finetune.EvalShardSampler).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

import util  # noqa: F401  (torchvision op schemas on CPU-only torch, before timm)

import torch
from timm.data.mixup import mixup_target
from timm.utils import accuracy

from d3p.collectives import all_reduce, is_dist, to_collective
from engine_pretrain import accumulation_divisor
from util import lr_sched
from util.amp import autocast_dtype
from util.device_input import DeviceNormalize, Stats
from util.dist import agree_at_sync_point
from util.metrics import MetricLogger, SmoothedValue


def _device_type(device) -> str:
    return torch.device(device).type


def _autocast(device, amp_dtype):
    return torch.autocast(device_type=_device_type(device), dtype=amp_dtype, enabled=amp_dtype is not None)


def _reduce_meters(metric_logger: MetricLogger) -> dict:
    """Global averages of every meter, over all steps of all ranks (one all_reduce per epoch)."""
    names = list(metric_logger.meters)
    if not names:
        return {}
    t = torch.tensor(
        [[metric_logger.meters[n].total, metric_logger.meters[n].count] for n in names],
        dtype=torch.float64,
    )
    if is_dist():
        t = all_reduce(to_collective(t)).cpu()
    return {n: (t[i, 0] / t[i, 1]).item() if t[i, 1] > 0 else float("nan") for i, n in enumerate(names)}


def train_one_epoch(
    model: torch.nn.Module,
    criterion,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device,
    epoch: int,
    loss_scaler,
    max_norm: float | None = None,
    mixup_fn=None,
    log_writer=None,
    args=None,
    input_stats: Stats | None = None,
    pruner=None,
) -> dict:
    """One epoch (0-based `epoch`, as MAE counts).

    criterion(logits [B, C], targets) -> per-sample losses [B] (d3p.per_sample_cross_entropy).
    pruner: the run's d3p.DataPruner after `begin_epoch` (None: the batch loss is the mean).
    input_stats: (mean, std) that normalise uint8 image batches on `device` (DeviceNormalize).
    Every step the ranks agree on the loss being finite (one scalar all-reduce, after the host sync
    `loss.item()` already makes) before any backward, so a NaN on one rank stops all of them at the
    same step. The epoch's last, partial accumulation group is stepped with its loss divided by its
    own size (engine_pretrain.accumulation_divisor), as in pre-training.
    Returns the epoch's averages: loss, lr (max over groups), grad_norm; and this rank's optimizer_steps and
    data_seconds (the cost ledger's inputs).
    """
    model.train(True)
    to_input = DeviceNormalize(input_stats, device)
    accum_iter = max(int(getattr(args, "accum_iter", 1)), 1)
    amp_dtype = autocast_dtype(getattr(args, "precision", "auto"), str(device))
    metric_logger = MetricLogger()
    # the same meters, in the same order, on every rank: _reduce_meters all-reduces them as one tensor
    metric_logger.add_meter("loss", SmoothedValue())
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("grad_norm", SmoothedValue())
    num_steps = len(data_loader)
    if num_steps == 0:
        raise RuntimeError(
            f"epoch {epoch}: the training loader is empty (dataset smaller than one batch with drop_last). "
            "Fix: lower --batch_size"
        )
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    params = [p for p in model.parameters() if p.requires_grad]

    optimizer_steps = 0
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(metric_logger.log_every(data_loader, header=f"Epoch: [{epoch}]", total=num_steps)):
        if step % accum_iter == 0:  # per-iteration (not per-epoch) schedule, at the fractional epoch
            lr_sched.adjust_learning_rate(optimizer, step / num_steps + epoch, args)
        samples = to_input(batch[0])
        targets = batch[1].to(device, non_blocking=True)
        index = batch[2] if len(batch) > 2 else None
        if mixup_fn is not None:
            mixup_fn.reseed(epoch, step)  # util.augment.SeededMixup: its draws depend on (epoch, step) only
            samples, targets = mix_batch(mixup_fn, samples, targets)

        # the last step of the epoch also updates (a correctly scaled partial group): no accumulated
        # gradient leaks into the next epoch
        update = (step + 1) % accum_iter == 0 or step + 1 == num_steps
        sync_ctx = model.no_sync() if (is_ddp and not update) else contextlib.nullcontext()
        with sync_ctx:
            with _autocast(device, amp_dtype):
                outputs = model(samples)
            # row i of a mixed batch is sample index[i] (mixed with its partner): its loss is recorded for index[i]
            per_sample = criterion(outputs, targets)
            loss = per_sample.mean() if pruner is None else pruner.batch_loss(per_sample, index)
            loss_value = loss.item()
            finite = math.isfinite(loss_value)
            _, bad_step, bad_rank = agree_at_sync_point(False, None if finite else step, num_steps)
            if bad_step is not None:
                seen = f"loss {loss_value}" if not finite else "loss"
                raise FloatingPointError(
                    f"non-finite training {seen} at epoch {epoch}, step {step}/{num_steps} (seen on rank "
                    f"{bad_rank}; all ranks stopped). Fix: lower --blr/--lr, set --clip_grad, or use "
                    "--precision fp32/bf16 instead of fp16"
                )
            grad_norm = loss_scaler(
                loss / accumulation_divisor(step, num_steps, accum_iter), optimizer, clip_grad=max_norm,
                parameters=params, update_grad=update,
            )
        if update:
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1

        max_lr = max(group["lr"] for group in optimizer.param_groups)
        metric_logger.update(loss=loss_value, lr=max_lr)
        if grad_norm is not None:
            grad_norm = float(grad_norm)
            if math.isfinite(grad_norm):  # fp16 overflow steps are skipped by the scaler: not logged either
                metric_logger.update(grad_norm=grad_norm)
        if log_writer is not None and update:
            # x-axis: epoch * 1000 (MAE's convention, comparable across batch sizes); rank 0's own loss,
            # so no per-step collective is needed
            epoch_1000x = int((step / num_steps + epoch) * 1000)
            log_writer.add_scalar("loss", loss_value, epoch_1000x)
            log_writer.add_scalar("lr", max_lr, epoch_1000x)

    stats = _reduce_meters(metric_logger)
    print("Averaged stats: " + "  ".join(f"{k}: {v:.6g}" for k, v in stats.items()))
    stats.update(optimizer_steps=optimizer_steps, data_seconds=metric_logger.data_seconds)
    return stats


def mix_batch(mixup_fn, samples: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup/CutMix; it needs an even batch, so an odd batch (the last one of a pruned epoch) mixes all
    but its last sample, which keeps its image and gets mixup_fn's smoothed one-hot target."""
    if samples.shape[0] % 2 == 0:
        return mixup_fn(samples, targets)
    mixed, soft = mixup_fn(samples[:-1], targets[:-1])
    last = mixup_target(targets[-1:], mixup_fn.num_classes, 1.0, mixup_fn.label_smoothing)
    return torch.cat([mixed, samples[-1:]]), torch.cat([soft, last.to(soft.dtype)])


@torch.no_grad()
def forward_only_pass(model: torch.nn.Module, criterion, data_loader: Iterable, device, epoch: int, pruner,
                      mixup_fn=None, amp_dtype: torch.dtype | None = None, input_stats: Stats | None = None) -> int:
    """Per-sample losses of the samples not trained this epoch (D3P's pruned set in recording epochs), recorded
    in the pruner: the same augmentation, Mixup/CutMix and criterion as training, no gradient. Returns the
    samples this rank processed."""
    model.eval()
    to_input = DeviceNormalize(input_stats, device)
    seen = 0
    batches = MetricLogger().log_every(data_loader, header=f"Forward-only [{epoch}]")
    for step, (samples, targets, index) in enumerate(batches):
        samples = to_input(samples)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            mixup_fn.reseed(epoch, step, forward_only=True)  # its own stream of (epoch, step) draws
            samples, targets = mix_batch(mixup_fn, samples, targets)
        with _autocast(device, amp_dtype):
            outputs = model(samples)
        pruner.record(index, criterion(outputs, targets))
        seen += int(index.numel())
    model.train(True)
    return seen


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device, amp_dtype: torch.dtype | None = None,
             input_stats: Stats | None = None) -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the union of all ranks' loaders.

    Correct counts, loss sums and sample counts are summed across ranks, so the result is exact when the
    loaders partition the val set (a rank may have an empty loader). Top-5 becomes top-k with k = #classes
    when there are fewer than 5 classes.
    """
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    to_input = DeviceNormalize(input_stats, device)
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for batch in MetricLogger().log_every(data_loader, header="Test:"):
        images = to_input(batch[0])
        target = batch[1].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        n = target.shape[0]
        acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        sums += torch.tensor(
            [
                round(acc1.item() * n / 100.0),  # timm returns percentages of integer counts: round back
                round(acc5.item() * n / 100.0),
                criterion(output, target).item(),
                n,
            ],
            dtype=torch.float64,
        )
    if is_dist():
        sums = all_reduce(to_collective(sums)).cpu()
    correct1, correct5, loss_sum, count = sums.tolist()
    if count == 0:
        raise RuntimeError("evaluation saw no samples on any rank: the val set is empty")
    stats = {
        "acc1": 100.0 * correct1 / count,
        "acc5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "num_samples": int(count),
    }
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({int(count)} images)")
    return stats
