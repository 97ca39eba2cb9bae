"""A DistributedSampler whose index list is rebuilt from the kept set before every epoch (spec §8)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class PrunedDistributedSampler(Sampler[int]):
    """Yields this rank's share of a subset of dataset indices.

    Before each epoch (`set_indices` then `set_epoch`) the kept indices are shuffled with a
    generator seeded by (seed, epoch) — identical on every rank —, padded by repetition to a
    multiple of the world size, and split `rank::num_replicas`. Every rank therefore gets the same
    number of samples (so the same number of batches: no rank waits in a collective for another),
    the ranks together cover the kept set, and an index outside it is never yielded, so a pruned
    sample is never loaded or decoded.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self._start = 0  # local samples already consumed this epoch (resume after preemption)
        self._offset = 0  # global positions done before a resume on another world size
        self._kept = np.arange(self.num_samples, dtype=np.int64)
        self._order = self._kept
        self._version = 0  # bumped by set_indices / set_replicas: which plan an iteration drew from
        self._iterated: tuple[int, int] | None = None  # (epoch, version) of the last __iter__
        self._local = self._kept[self.rank :: self.num_replicas]
        self.set_epoch(0)

    def set_replicas(self, num_replicas: int, rank: int) -> None:
        """Split across `num_replicas` ranks as `rank` from the next `set_epoch` on (the pruner reads them from
        torch.distributed at each epoch when it was not given them)."""
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self._version += 1

    def set_indices(self, kept: np.ndarray) -> None:
        """The dataset indices to iterate from the next `set_epoch` on (int array, any order)."""
        kept = np.asarray(kept, dtype=np.int64)
        if kept.size == 0:
            raise ValueError("the kept set is empty: nothing to train on")
        if kept.min() < 0 or kept.max() >= self.num_samples:
            raise ValueError(f"kept indices outside [0, {self.num_samples})")
        self._kept = kept
        self._version += 1

    def set_epoch(self, epoch: int) -> None:
        """Rebuild this rank's index list for `epoch`."""
        self.epoch = int(epoch)
        order = self._kept
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, self.epoch]).permutation(order.size)]
        self._order = order  # the epoch's global order, unpadded: every rank computes the same
        self._offset = 0
        self._split()

    def _split(self) -> None:
        """This rank's list: the global order from `_offset` on, padded by repetition from the start of
        the epoch's order to a multiple of the world size, split `rank::num_replicas`."""
        rest = self._order[self._offset :]
        total = -(-rest.size // self.num_replicas) * self.num_replicas
        if total != rest.size:
            rest = np.concatenate([rest, np.resize(self._order, total - rest.size)])  # padding by repetition
        self._local = rest[self.rank :: self.num_replicas]
        self._start = 0

    def skip(self, num_local_samples: int) -> None:
        """Start this epoch's iteration after the first `num_local_samples` of this rank's list
        (resuming an epoch that a preemption interrupted); reset by the next `set_epoch`."""
        self._start = int(min(max(num_local_samples, 0), len(self._local)))

    def samples_done(self, num_local_samples: int) -> int:
        """Positions of the epoch's global order trained once every rank has taken `num_local_samples`
        more samples of its list (after the skipped ones): rank r's j-th sample is global position
        offset + j * num_replicas + r, so the ranks together have trained a prefix of the order. What
        a mid-epoch checkpoint stores; `resume_epoch` takes it on any world size. Padding counts: once every rank
        has taken its whole list this is the padded total (`total_size`), so a resume on the same world size skips
        exactly the same positions, padding included, and counts the same samples trained."""
        local = self._start + int(num_local_samples)
        return int(min(self.total_size, self._offset + local * self.num_replicas))

    def resume_epoch(self, samples_done: int) -> None:
        """Continue this epoch after the first `samples_done` positions of its global order (the value
        `samples_done` gave before a preemption, with this or another world size or batch size).

        With the world size of the interrupted run this is `skip(samples_done / num_replicas)`: the same
        list, positions and padding. With another world size the remaining samples are split anew, so
        every kept sample is still trained exactly once this epoch (padding aside): none is trained twice,
        none is left out (a left-out sample would get no loss in a recording epoch, and be pruned)."""
        padded = -(-self._order.size // self.num_replicas) * self.num_replicas
        done = max(int(samples_done), 0)
        if done % self.num_replicas == 0 and done <= padded:  # whole rounds: the same lists, a prefix skipped
            self._offset = 0
            self._split()
            self.skip(done // self.num_replicas)
        else:  # another world size: the rest of the order (none when padding ran past its end), split anew
            self._offset = done
            self._split()

    @property
    def skipped(self) -> int:
        """Positions of this rank's epoch list skipped by `skip` or `resume_epoch` (their item seeds stay
        reserved)."""
        return self._offset // self.num_replicas + self._start

    @property
    def kept(self) -> np.ndarray:
        return self._kept

    @property
    def total_size(self) -> int:
        """Samples of all ranks together in this whole epoch (padding included, skipping not; after a
        `resume_epoch` on another world size: the part done before it plus the padded rest)."""
        return self._offset + len(self._local) * self.num_replicas

    @property
    def iterated_current(self) -> bool:
        """True when the last iteration began after the current epoch's `set_indices`/`set_epoch` (a loader
        whose iteration started earlier, e.g. workers prefetching, draws the previous plan)."""
        return self._iterated == (self.epoch, self._version)

    def __iter__(self) -> Iterator[int]:
        self._iterated = (self.epoch, self._version)
        return iter(self._local[self._start :].tolist())

    def __len__(self) -> int:
        return len(self._local) - self._start


def balanced_batch_sizes(n: int, batch_size: int, multiple_of: int = 1) -> list[int]:
    """Sizes of ceil(n / batch_size) batches that hold n samples and differ by at most one, larger first:
    every sample is trained once and no batch is a runt (450 samples in batches of 64 -> 2 x 57 + 6 x 56, not
    7 x 64 + 2). [] for n == 0.

    multiple_of m (a divisor of batch_size): the sizes are multiples of m, differing by at most m, except the last
    batch, which also takes the n % m samples left over (Mixup/CutMix pair the samples of a batch: m = 2 leaves at
    most one batch of an epoch with an odd size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} < 1. Fix: give a positive batch size")
    if n < 0:
        raise ValueError(f"n {n} < 0 samples")
    if multiple_of < 1 or batch_size % multiple_of:
        raise ValueError(f"multiple_of {multiple_of} must be >= 1 and divide batch_size {batch_size}")
    count = -(-int(n) // int(batch_size))
    if count == 0:
        return []
    units, rest = divmod(int(n), multiple_of)
    small, larger = divmod(units, count)
    sizes = [(small + 1) * multiple_of] * larger + [small * multiple_of] * (count - larger)
    sizes[-1] += rest
    return sizes


class BalancedBatchSampler(Sampler[list]):
    """Batches of `sampler`'s items (ints, or ItemSeedSampler's (index, seed) pairs) in the sizes of
    `balanced_batch_sizes(epoch length, batch_size)`.

    Resume: a sampler that resumes an epoch after `skipped` positions of its list (PrunedDistributedSampler.skip /
    resume_epoch, and ItemSeedSampler over it) yields only the rest. The sizes are those of the whole epoch
    (`skipped` + the rest), so an interrupted epoch trains the same batches as an uninterrupted one: the batches
    that end at or before `skipped` are not yielded, and when `skipped` falls inside a batch, the rest of that batch
    is yielded as one batch.

    `drop_last=True` is torch's BatchSampler(drop_last=True) over the rest (MAE's batching: full batches only, the
    remainder dropped), for parity checks. `multiple_of`: see balanced_batch_sizes (2 for Mixup/CutMix).
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool = False, multiple_of: int = 1):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size {batch_size} < 1. Fix: give a positive batch size")
        balanced_batch_sizes(0, int(batch_size), int(multiple_of))  # refuses a multiple_of that does not divide
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.multiple_of = int(multiple_of)

    def _bounds(self, skipped: int, remaining: int) -> list[tuple[int, int]]:
        """(start, end) in this rank's epoch list of each batch still to yield."""
        bounds, start = [], 0
        for size in balanced_batch_sizes(skipped + remaining, self.batch_size, self.multiple_of):
            end = start + size
            if end > skipped:
                bounds.append((max(start, skipped), end))
            start = end
        return bounds

    def __iter__(self):
        remaining = list(iter(self.sampler))
        if self.drop_last:
            full = len(remaining) - len(remaining) % self.batch_size
            for start in range(0, full, self.batch_size):
                yield remaining[start : start + self.batch_size]
            return
        skipped = int(getattr(self.sampler, "skipped", 0))
        for start, end in self._bounds(skipped, len(remaining)):
            yield remaining[start - skipped : end - skipped]

    def __len__(self) -> int:
        remaining = len(self.sampler)
        if self.drop_last:
            return remaining // self.batch_size
        return len(self._bounds(int(getattr(self.sampler, "skipped", 0)), remaining))
