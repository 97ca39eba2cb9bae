"""Per-item seeding: the augmentation of every item is a pure function of (seed, stream, epoch, rank, position).

A DataLoader's sampler is wrapped in ItemSeedSampler, which yields (dataset index, item seed) keys, and its
dataset in SeededItems, which seeds the worker's torch and Python RNGs from the key before the transforms run.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

# `stream` of ItemSeedSampler: loaders of one run draw independent augmentation
STREAM_TRAIN, STREAM_FORWARD_ONLY, STREAM_EMBED = 0, 1, 2
STREAM_MIXUP = 3  # fine-tuning's Mixup/CutMix draws in the training process (util.augment.SeededMixup)


class ItemSeedSampler(Sampler):
    """Yields (dataset index, item seed) for each index of `base` (a sampler with `.epoch`).

    The item seed is a pure function of (seed, stream, epoch, rank, position in this rank's list of
    the epoch): 63 bits of SeedSequence([seed, stream, epoch, rank]) plus the position. A sampler
    that resumes an epoch after `skipped` positions (PrunedDistributedSampler.skip) gives the
    remaining positions the same seeds as an uninterrupted epoch.
    """

    def __init__(self, base: Sampler, seed: int, rank: int, stream: int):
        self.base = base
        self.seed, self.rank, self.stream = int(seed), int(rank), int(stream)

    def epoch_key(self, epoch: int) -> int:
        words = np.random.SeedSequence([self.seed, self.stream, int(epoch), self.rank]).generate_state(2)
        return ((int(words[0]) << 32) | int(words[1])) >> 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        key = self.epoch_key(getattr(self.base, "epoch", 0))
        first = self.skipped
        for position, index in enumerate(self.base, start=first):
            yield int(index), (key + position) % (1 << 63)

    @property
    def skipped(self) -> int:
        """Positions of the base sampler's epoch list skipped by a resume (0 for a sampler that cannot skip):
        d3p.sampler.BalancedBatchSampler sizes the epoch's batches from it."""
        return int(getattr(self.base, "skipped", 0))

    def __len__(self) -> int:
        return len(self.base)


class SeededItems(Dataset):
    """Takes the (index, item seed) keys of ItemSeedSampler and returns `base[index]`.

    Inside a DataLoader worker the item's torch and Python RNGs are seeded from the key before the
    transforms run, so the augmentation does not depend on the number of workers, on which worker
    gets the batch, on persistent workers, or on a restart. With --num_workers 0 the items are
    made in the training process and continue its RNG stream, which every checkpoint saves and
    restores (ckpt_util.gather_rng_states): that path was already exact and stays unchanged.
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, item_seed = key
        if get_worker_info() is not None:  # a worker process of its own: its global RNGs are this item's
            torch.manual_seed(item_seed)
            random.seed(item_seed)
        return self.base[index]
