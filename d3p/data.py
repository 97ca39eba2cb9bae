"""Items that carry their dataset index, and a DataLoader re-built around the pruner's sampler.

The pruner needs each sample's dataset index next to its loss. Two ways to carry it, both plain data (no
state shared between dataset and loader, nothing patched):

    IndexedDataset(dataset)       tuple items -> (*item, index); dict items -> {**item, "index": index};
                                  any other item -> (item, index). For loops that unpack the index themselves.
    pruned_loader(loader, sampler)  the same DataLoader settings (batch size, workers, collate_fn, pinning, ...)
                                  over the same dataset, with `sampler` in place of the loader's shuffle or
                                  DistributedSampler; each batch is (the loader's own batch, int64 [B] indices),
                                  so the user's collate_fn sees the user's items unchanged. Balanced batches
                                  (d3p.sampler.BalancedBatchSampler): every kept sample once, no runt.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              Sampler, SequentialSampler)

from d3p.sampler import BalancedBatchSampler

__all__ = ["IndexedDataset", "IndexedCollate", "pruned_loader", "INDEX_KEY"]

INDEX_KEY = "index"  # the key of a dict item's dataset index (IndexedDataset)


class IndexedDataset(Dataset):
    """`dataset` whose items carry their dataset index (int) as the last tuple element or the "index" key."""

    def __init__(self, dataset: Dataset, key: str = INDEX_KEY):
        if isinstance(dataset, IterableDataset):
            raise TypeError("an IterableDataset has no dataset indices to prune by. Fix: give a map-style Dataset "
                            "(with __len__ and __getitem__)")
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, tuple) or isinstance(item, list):
            return (*item, index)
        if isinstance(item, dict):
            if self.key in item:
                raise ValueError(f"the dataset's items already have a {self.key!r} key. Fix: "
                                 f"IndexedDataset(dataset, key='another_name')")
            return {**item, self.key: index}
        return (item, index)


class _ItemAndIndex(Dataset):
    """(the item unchanged, its dataset index): what `IndexedCollate` splits again."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index], index


class IndexedCollate:
    """[(item, index)] * B -> (collate_fn([item] * B), int64 [B]): the user's collate sees the user's items.
    A class (not a closure) so that DataLoader workers started with spawn can pickle it."""

    def __init__(self, collate_fn: Callable[[list], Any]):
        self.collate_fn = collate_fn

    def __call__(self, pairs: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        return self.collate_fn([item for item, _ in pairs]), torch.tensor([i for _, i in pairs], dtype=torch.int64)


# samplers the pruner's sampler may stand in for: they only order (or shard) every index of the dataset
_REPLACEABLE = (RandomSampler, SequentialSampler, DistributedSampler)


def pruned_loader(loader: DataLoader, sampler: Sampler, dataset: Dataset | None = None) -> DataLoader:
    """A DataLoader with `loader`'s settings over its dataset (or `dataset`), drawing indices from `sampler`;
    batches are (loader's batch, int64 [B] dataset indices).

    The batches are balanced (`d3p.sampler.BalancedBatchSampler` with the loader's batch_size): ceil(K / B)
    batches of the epoch's K samples whose sizes differ by at most one. The loader's `drop_last` is not carried:
    balanced batches train every kept sample (a dropped one would get no loss, and a loss-scored method would
    prune it for that) and leave no runt to drop.

    Refuses a loader whose sampler does more than order the whole dataset (a WeightedRandomSampler, a custom
    batch_sampler): the pruner's sampler would silently drop that behaviour.
    """
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError("the loader reads an IterableDataset, which has no dataset indices to prune by. Fix: give "
                        "a map-style Dataset (with __len__ and __getitem__)")
    if loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
        raise ValueError(f"the loader uses a custom batch_sampler ({type(loader.batch_sampler).__name__}), which "
                         "the pruner cannot replace without dropping its behaviour. Fix: build the DataLoader with "
                         "batch_size=... (no batch_sampler), or pass sampler=pruner.sampler yourself")
    if not isinstance(loader.sampler, _REPLACEABLE) and loader.sampler is not sampler:
        raise ValueError(f"the loader's sampler is a {type(loader.sampler).__name__}; the pruner replaces only "
                         "shuffle=True/False or a DistributedSampler, because its own sampler decides which "
                         "samples are drawn. Fix: build the DataLoader with shuffle=True (or a DistributedSampler)")
    options: dict[str, Any] = dict(
        batch_sampler=BalancedBatchSampler(sampler, loader.batch_size), num_workers=loader.num_workers,
        collate_fn=IndexedCollate(loader.collate_fn), pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator, persistent_workers=loader.persistent_workers, in_order=loader.in_order,
    )
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(_ItemAndIndex(loader.dataset if dataset is None else dataset), **options)
