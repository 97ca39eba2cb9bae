"""DataLoader plumbing shared by the entry scripts: the training and evaluation loaders (seeded items, workers
that outlive a stop signal), batch collation, the default worker count and the short-last-batch warning."""
from __future__ import annotations

import argparse
import atexit
import os
import weakref
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from d3p.collectives import get_rank
from d3p.sampler import BalancedBatchSampler
from util.item_seeding import ItemSeedSampler, SeededItems
from util.stop import stop_signals_blocked, worker_init


def collate_indexed(batch):
    """Default collation, kept explicit so the index column stays an int64 tensor (images keep their
    dtype: uint8 from util.image_transforms, float32 from timm's fine-tuning transform).

    Images in channels-last memory (the uint8 JPEG transforms) are stacked as [B, H, W, C] and returned
    as the [B, C, H, W] view of it: a plain copy, where stacking the [C, H, W] views would transpose every
    image. The pinned copy and the host-to-device copy keep that layout (pin_memory keeps strides);
    DeviceNormalize returns a contiguous float batch. Stacking goes through torch's default_collate,
    which in a DataLoader worker writes the batch straight into shared memory (no second copy of it on
    the way to the main process)."""
    first = batch[0][0]
    if first.dim() == 3 and first.stride(0) == 1 and first.shape[0] > 1:  # channels-last [C, H, W]
        imgs = default_collate([b[0].permute(1, 2, 0) for b in batch]).permute(0, 3, 1, 2)
    else:
        imgs = default_collate([b[0] for b in batch])
    targets = torch.as_tensor([b[1] for b in batch], dtype=torch.long)
    index = torch.as_tensor([b[2] for b in batch], dtype=torch.long)
    return imgs, targets, index


MAX_DEFAULT_WORKERS = 16  # each worker holds a copy of the file list; more rarely pays off per GPU


def _leading_int(value: str) -> int:
    """SLURM writes per-node task counts like '4' or '4(x2)'."""
    digits = ""
    for ch in value.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 1


def default_num_workers(environ: dict | None = None) -> int:
    """`--num_workers` default: the CPUs this process may run on, shared by the processes of this node.

    torchrun starts every local rank with the launcher's CPU set: divide it by LOCAL_WORLD_SIZE. A
    SLURM task without torchrun has its own budget SLURM_CPUS_PER_TASK, or else shares the node's CPU
    set with SLURM_NTASKS_PER_NODE tasks. At least 1, at most MAX_DEFAULT_WORKERS.
    """
    env = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if env.get("LOCAL_WORLD_SIZE"):
        per_process = cpus // max(_leading_int(env["LOCAL_WORLD_SIZE"]), 1)
    elif env.get("SLURM_CPUS_PER_TASK"):
        per_process = min(cpus, _leading_int(env["SLURM_CPUS_PER_TASK"]))
    elif env.get("SLURM_NTASKS_PER_NODE"):
        per_process = cpus // max(_leading_int(env["SLURM_NTASKS_PER_NODE"]), 1)
    else:
        per_process = cpus
    return max(1, min(MAX_DEFAULT_WORKERS, per_process))


_LOADERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()  # the loaders whose workers ignore stop signals


def _release_workers() -> None:
    """At interpreter exit, before torch's and multiprocessing's exit hooks (atexit runs the newest first):
    drop the persistent iterators of our loaders, whose __del__ then stops their workers in order.

    Why: at exit torch skips its orderly worker shutdown and multiprocessing ends daemonic workers with
    terminate() (SIGTERM), which these workers ignore; its join would then wait forever."""
    for loader in list(_LOADERS):
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator = None


atexit.register(_release_workers)


class StopSafeDataLoader(DataLoader):
    """A DataLoader whose workers outlive a stop signal: they ignore the stop signals (util.stop.worker_init, run
    before the given worker_init_fn), are started with them blocked so that one sent while they start waits for
    that (util.stop.stop_signals_blocked), and, when persistent, are stopped in order at exit (_release_workers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_workers > 0:
            self.worker_init_fn = worker_init(then=self.worker_init_fn)
            _LOADERS.add(self)

    def __iter__(self):
        with stop_signals_blocked():  # the first call starts the workers (persistent: once per loader)
            return super().__iter__()


def make_loader(dataset: Dataset, sampler: Sampler, args: argparse.Namespace, batch_size: int, stream: int,
                drop_last: bool = False, multiple_of: int = 1) -> DataLoader:
    """A training-side loader: items come with their dataset index, and their augmentation is a function of
    (seed, stream, epoch, rank, position) in worker processes (util.item_seeding.SeededItems), so a resume with
    workers replays it exactly. Workers ignore stop signals (StopSafeDataLoader).

    Batches are balanced (d3p.BalancedBatchSampler): each rank's K samples of the epoch in ceil(K / batch_size)
    batches whose sizes differ by at most one (by at most `multiple_of`, all multiples of it but the last, for
    Mixup's pairs), so every kept sample is trained once and no step is a runt. `drop_last`: MAE's batching
    (full batches, the rest dropped), for parity checks only."""
    items = ItemSeedSampler(sampler, args.seed, get_rank(), stream)
    return StopSafeDataLoader(
        SeededItems(dataset), batch_sampler=BalancedBatchSampler(items, batch_size, drop_last, multiple_of),
        collate_fn=collate_indexed, generator=torch.Generator(),
        **_worker_options(args),  # creating an iterator never draws from the global RNG (own generator)
    )


def make_eval_loader(dataset: Dataset, sampler: Sampler, args: argparse.Namespace, batch_size: int,
                     collate_fn: Callable | None = None) -> DataLoader:
    """An evaluation loader (no augmentation to seed); its workers ignore stop signals too.

    Its own generator, as in make_loader: creating an iterator would otherwise draw a worker seed from the
    global torch RNG. With persistent workers that happens once per run, so a run resumed mid-training would
    draw it at another point than the uninterrupted run, and every drop-path mask after it would differ."""
    return StopSafeDataLoader(dataset, sampler=sampler, batch_size=batch_size, drop_last=False,
                              collate_fn=collate_fn, generator=torch.Generator(), **_worker_options(args))


def _worker_options(args: argparse.Namespace) -> dict:
    workers = int(args.num_workers)
    return dict(num_workers=workers, pin_memory=bool(args.pin_mem) and str(args.device).startswith("cuda"),
                persistent_workers=workers > 0)
