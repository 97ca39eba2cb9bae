"""MAE pre-training's part of the engine: its per-sample loss (`MAELoss`), which util.engine's one loop trains
with, and the embedding pass of D2 Pruning and k-NN."""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from d3p.collectives import all_reduce, is_dist, to_collective
from util.device_input import DeviceNormalize, Stats
from util.engine import autocast, stoppable, training_mode
from util.metrics import MetricLogger


class MAELoss:
    """MAE's per-sample reconstruction loss of a batch (images, targets, dataset_index) -> (loss [B], index [B]):
    uint8 images normalised on the device, random masking at `mask_ratio`, the forward under autocast."""

    def __init__(self, model: torch.nn.Module, device: torch.device, mask_ratio: float,
                 amp_dtype: torch.dtype | None = None, input_stats: Stats | None = None):
        self.model, self.device, self.mask_ratio, self.amp_dtype = model, device, mask_ratio, amp_dtype
        self.to_input = DeviceNormalize(input_stats, device)

    def __call__(self, batch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        samples, _, index = batch
        with autocast(self.device, self.amp_dtype):
            per_sample, _, _ = self.model(self.to_input(samples), mask_ratio=self.mask_ratio)
        return per_sample, index


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
    feats = np.zeros((num_samples, net.pos_embed.shape[-1]), dtype=np.float32)
    counts = np.zeros(num_samples, dtype=np.float32)
    seen, stopped = 0, [False]
    to_input = DeviceNormalize(input_stats, device)
    batches = MetricLogger().log_every(data_loader, "Embeddings")
    with training_mode(net, False):
        for samples, _, index in stoppable(batches, len(data_loader), stop_requested, print_freq, stopped):
            with autocast(device, amp_dtype):
                e = net.embed(to_input(samples)).float().cpu().numpy()
            idx = index.numpy()
            valid = idx >= 0
            np.add.at(feats, idx[valid], e[valid])
            np.add.at(counts, idx[valid], 1.0)
            seen += idx.size
    if stopped[0]:
        return None, seen
    if is_dist():
        feats = all_reduce(to_collective(torch.from_numpy(feats))).cpu().numpy()
        counts = all_reduce(to_collective(torch.from_numpy(counts))).cpu().numpy()
    return feats / np.maximum(counts, 1.0)[:, None], seen
