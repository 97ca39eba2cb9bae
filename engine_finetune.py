"""Fine-tuning / linear-probing engine: one training epoch and the evaluation loop (after MAE's engine_finetune.py).

Train items are (image, target, dataset_index) (index optional without a pruner), val items (image, target[, ...]).
The criterion gives per-sample losses; `d3p.DataPruner.batch_loss` turns them into the batch loss (the method's
weights) and records them. Training statistics are per rank during the epoch and
reduced across ranks once at its end; evaluation sums correct counts and totals across ranks, so the accuracy is
exact whenever the ranks' val loaders partition the val set (see main_finetune.EvalShardSampler).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import torch
from timm.data.mixup import mixup_target
from timm.utils import accuracy

from d3p.collectives import all_reduce, is_dist, to_collective
from util import lr_sched
from util.amp import autocast_dtype
from util.device_input import DeviceNormalize, Stats
from util.engine import (  # noqa: F401  (NonFiniteLossError: the engine's error, re-exported for callers)
    NonFiniteLossError, SyncPoint, accumulation_divisor, autocast, no_sync_unless, stoppable, training_mode,
)
from util.metrics import MetricLogger, SmoothedValue

METERS = ("loss", "lr", "grad_norm")  # the epoch statistics, reduced over ranks once at the epoch's end


def _meter_sums(metric_logger: MetricLogger) -> torch.Tensor:
    """float64 [len(METERS), 2]: (total, count) of each meter on this rank."""
    return torch.tensor([[metric_logger.meters[n].total, metric_logger.meters[n].count] for n in METERS],
                        dtype=torch.float64)


def _reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """The meters' (total, count) summed over ranks (one all-reduce)."""
    return all_reduce(to_collective(sums)).cpu() if is_dist() else sums


def _averages(sums: torch.Tensor) -> dict:
    """Global averages of every meter, over all steps of all ranks."""
    return {n: (sums[i, 0] / sums[i, 1]).item() if sums[i, 1] > 0 else float("nan") for i, n in enumerate(METERS)}


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
    start_step: int = 0,
    carried: dict | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict:
    """One epoch (0-based `epoch`, as MAE counts).

    criterion(logits [B, C], targets) -> per-sample losses [B] (d3p.per_sample_cross_entropy).
    pruner: the run's d3p.DataPruner after `begin_epoch` (None: the batch loss is the mean).
    input_stats: (mean, std) that normalise uint8 image batches on `device` (DeviceNormalize).
    start_step, carried: resume an epoch a preemption interrupted after `start_step` steps (the loader then
        yields only the remaining batches); `carried["meters"]` holds that part's meter sums (all ranks').
    stop_requested: polled on every rank every `args.print_freq` steps (util.engine.SyncPoint: the same
        all-reduce carries the NaN check, one host sync per chunk, none per step); the ranks stop together
        after an optimizer step (the stats then carry `interrupted_at_step`) or all raise NonFiniteLossError.
    The epoch's last, partial accumulation group is stepped with its loss divided by its own size
    (util.engine.accumulation_divisor), as in pre-training.
    Returns the epoch's averages over all ranks: loss, lr (max over groups), grad_norm; the meter sums
    (`meter_sums`, for a mid-epoch checkpoint); and this rank's optimizer_steps and data_seconds (the cost
    ledger's inputs).
    """
    model.train(True)
    to_input = DeviceNormalize(input_stats, device)
    accum_iter = max(int(getattr(args, "accum_iter", 1)), 1)
    amp_dtype = autocast_dtype(getattr(args, "precision", "auto"), str(device))
    metric_logger = MetricLogger()
    metric_logger.add_meter("loss", SmoothedValue())
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("grad_norm", SmoothedValue())
    num_steps = start_step + len(data_loader)
    if num_steps == 0:
        raise RuntimeError(
            f"epoch {epoch}: the training loader is empty (dataset smaller than one batch with drop_last). "
            "Fix: lower --batch_size"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    sync = SyncPoint(epoch, start_step, num_steps, getattr(args, "print_freq", 20), stop_requested)
    grad_norms: list[torch.Tensor] = []  # the updates' norms since the last sync point, on the device
    lrs: list[float] = []  # the steps' lr since the last sync point
    optimizer_steps = int((carried or {}).get("optimizer_steps", 0))
    interrupted_at = None
    optimizer.zero_grad(set_to_none=True)
    batches = metric_logger.log_every(data_loader, header=f"Epoch: [{epoch}]")
    for step, batch in enumerate(batches, start=start_step):
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
        with no_sync_unless(model, update):
            with autocast(device, amp_dtype):
                outputs = model(samples)
            # row i of a mixed batch is sample index[i] (mixed with its partner): its loss is recorded for index[i]
            per_sample = criterion(outputs, targets)
            loss = per_sample.mean() if pruner is None else pruner.batch_loss(per_sample, index)
            grad_norm = loss_scaler(
                loss / accumulation_divisor(step, num_steps, accum_iter), optimizer, clip_grad=max_norm,
                parameters=params, update_grad=update,
            )
        if update:
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1
            if grad_norm is not None:
                grad_norms.append(grad_norm.detach().float().reshape(()))
        lrs.append(max(group["lr"] for group in optimizer.param_groups))
        sync.add(loss)
        if sync.due(step):
            values, first, stop_all = sync.check()
            _log_chunk(metric_logger, values, lrs, grad_norms, log_writer, first, num_steps, epoch, accum_iter)
            grad_norms, lrs = [], []
            if stop_all and update and step + 1 < num_steps:
                interrupted_at = step + 1
                break

    sums = _reduce_sums(_meter_sums(metric_logger))
    if carried and "meters" in carried:
        sums = sums + carried["meters"]  # the interrupted part's sums over all ranks
    stats = _averages(sums)
    print("Averaged stats: " + "  ".join(f"{k}: {v:.6g}" for k, v in stats.items()))
    stats.update(optimizer_steps=optimizer_steps, data_seconds=metric_logger.data_seconds,
                 interrupted_at_step=interrupted_at, meter_sums=sums)
    return stats


def _log_chunk(metric_logger: MetricLogger, values, lrs: list[float], grad_norms: list[torch.Tensor], log_writer,
               first: int, num_steps: int, epoch: int, accum_iter: int) -> None:
    """The meters and TensorBoard points of the steps since the last sync point (already on the host).

    x-axis: epoch * 1000 (MAE's convention, comparable across batch sizes); rank 0's own losses, at the
    updating steps, so no collective is needed."""
    for value, lr in zip(values, lrs):
        metric_logger.meters["loss"].update(float(value))
        metric_logger.meters["lr"].update(lr)
    if grad_norms:
        for norm in torch.stack(grad_norms).cpu().tolist():
            if math.isfinite(norm):  # fp16 overflow steps are skipped by the scaler: not logged either
                metric_logger.meters["grad_norm"].update(norm)
    if log_writer is None:
        return
    for k, (value, lr) in enumerate(zip(values, lrs)):
        step = first + k
        if (step + 1) % accum_iter == 0 or step + 1 == num_steps:
            epoch_1000x = int((step / num_steps + epoch) * 1000)
            log_writer.add_scalar("loss", float(value), epoch_1000x)
            log_writer.add_scalar("lr", lr, epoch_1000x)


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
                      mixup_fn=None, amp_dtype: torch.dtype | None = None, input_stats: Stats | None = None,
                      stop_requested: Callable[[], bool] | None = None, print_freq: int = 20) -> int | None:
    """Per-sample losses of the samples not trained this epoch (D3P's pruned set in recording epochs), recorded
    in the pruner: the same augmentation, Mixup/CutMix and criterion as training, no gradient.

    The model runs in training mode (drop path, dropout), as the training losses of the kept samples were
    recorded: both sets of losses come from one distribution. In eval mode the pruned samples would look
    easier than the trained ones (no drop path) and would stay pruned; the published D3P code likewise
    records the pruned samples' losses with the model as it trains. A BatchNorm would update its running
    statistics here: MAE's ViT has none, and the linear probe (BatchNorm head) does not prune.
    Returns the samples this rank processed, or None when the ranks agreed to stop (every `print_freq`
    batches): nothing is recorded then, and the caller saves the state from before the pass.
    """
    to_input = DeviceNormalize(input_stats, device)
    seen, stopped, records = 0, [False], []
    batches = MetricLogger().log_every(data_loader, header=f"Forward-only [{epoch}]")
    with training_mode(model, True):
        for step, (samples, targets, index) in enumerate(
                stoppable(batches, len(data_loader), stop_requested, print_freq, stopped)):
            samples = to_input(samples)
            targets = targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                mixup_fn.reseed(epoch, step, forward_only=True)  # its own stream of (epoch, step) draws
                samples, targets = mix_batch(mixup_fn, samples, targets)
            with autocast(device, amp_dtype):
                outputs = model(samples)
            records.append((index, criterion(outputs, targets)))
            seen += int(index.numel())
    if stopped[0]:
        return None
    for index, losses in records:
        pruner.record(index, losses)
    return seen


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device, amp_dtype: torch.dtype | None = None,
             input_stats: Stats | None = None, stop_requested: Callable[[], bool] | None = None) -> dict | None:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the union of all ranks' loaders.

    Correct counts, loss sums and sample counts are summed across ranks, so the result is exact when the
    loaders partition the val set (a rank may have an empty loader). Top-5 becomes top-k with k = #classes
    when there are fewer than 5 classes.
    stop_requested: checked on this rank after every batch (the ranks' val loaders may differ in length, so
    there is no collective per batch); a rank asked to stop ends its loop, and the one all-reduce at the end
    tells every rank. Returns None when any rank stopped (the result would be partial).
    """
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    to_input = DeviceNormalize(input_stats, device)
    sums = torch.zeros(5, dtype=torch.float64)  # correct@1, correct@5, loss sum, count, ranks stopped
    with training_mode(model, False):
        for batch in MetricLogger().log_every(data_loader, header="Test:"):
            images = to_input(batch[0])
            target = batch[1].to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                output = model(images)
            output = output.float()
            n = target.shape[0]
            acc1, acc5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
            sums[:4] += torch.tensor(
                [
                    round(acc1.item() * n / 100.0),  # timm returns percentages of integer counts: round back
                    round(acc5.item() * n / 100.0),
                    criterion(output, target).item(),
                    n,
                ],
                dtype=torch.float64,
            )
            if stop_requested is not None and stop_requested():
                sums[4] = 1.0
                break
    if is_dist():
        sums = all_reduce(to_collective(sums)).cpu()
    correct1, correct5, loss_sum, count, stopped = sums.tolist()
    if stopped:
        print("evaluation stopped by a signal")
        return None
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
