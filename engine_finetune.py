"""Fine-tuning / linear-probing's part of the engine (after MAE's engine_finetune.py): the supervised per-sample loss
(`SupervisedLoss`: mixup, the criterion), which util.engine's one loop trains with, and the evaluation loop.

Train items are (image, target, dataset_index) (index optional without a pruner), val items (image, target[, ...]).
Evaluation sums correct counts and totals across ranks, so the accuracy is exact whenever the ranks' val loaders
partition the val set (see main_finetune.EvalShardSampler).
"""
from __future__ import annotations

from typing import Callable, Iterable

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import torch
from timm.data.mixup import mixup_target
from timm.utils import accuracy

from d3p.collectives import all_reduce, is_dist, to_collective
from util.device_input import DeviceNormalize, Stats
from util.engine import autocast, training_mode
from util.metrics import MetricLogger

class SupervisedLoss:
    """The per-sample classification loss of a batch (images, targets[, dataset_index]) -> (loss [B], index [B] or
    None): images normalised on the device, Mixup/CutMix drawn from (seed, epoch, rank, step) (util.augment.
    SeededMixup: exact after a resume; the forward-only pass has its own stream), the forward under autocast, then
    `criterion` (d3p.per_sample_cross_entropy). Row i of a mixed batch is sample index[i] mixed with its partner:
    its loss is recorded for index[i]."""

    def __init__(self, model: torch.nn.Module, criterion, device, epoch: int, mixup_fn=None,
                 amp_dtype: torch.dtype | None = None, input_stats: Stats | None = None, forward_only: bool = False):
        self.model, self.criterion, self.device, self.epoch = model, criterion, device, epoch
        self.mixup_fn, self.amp_dtype, self.forward_only = mixup_fn, amp_dtype, forward_only
        self.to_input = DeviceNormalize(input_stats, device)

    def __call__(self, batch, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        samples = self.to_input(batch[0])
        targets = batch[1].to(self.device, non_blocking=True)
        if self.mixup_fn is not None:
            self.mixup_fn.reseed(self.epoch, step, **({"forward_only": True} if self.forward_only else {}))
            samples, targets = mix_batch(self.mixup_fn, samples, targets)
        with autocast(self.device, self.amp_dtype):
            outputs = self.model(samples)
        return self.criterion(outputs, targets), (batch[2] if len(batch) > 2 else None)


def mix_batch(mixup_fn, samples: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup/CutMix; it needs an even batch, so an odd batch (the last one of a pruned epoch) mixes all
    but its last sample, which keeps its image and gets mixup_fn's smoothed one-hot target."""
    if samples.shape[0] % 2 == 0:
        return mixup_fn(samples, targets)
    mixed, soft = mixup_fn(samples[:-1], targets[:-1])
    last = mixup_target(targets[-1:], mixup_fn.num_classes, 1.0, mixup_fn.label_smoothing)
    return torch.cat([mixed, samples[-1:]]), torch.cat([soft, last.to(soft.dtype)])


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
