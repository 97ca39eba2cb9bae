"""Symmetric label noise for the noisy-label benchmark (docs/supervised.md): a seeded, exact share of the
training labels replaced by another class, drawn uniformly.

    noisy, mislabelled = symmetric_label_noise(targets, num_classes=10, rate=0.2, seed=0)
"""
from __future__ import annotations

import numpy as np


def symmetric_label_noise(targets, num_classes: int, rate: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> (noisy int64 [N], mislabelled bool [N]).

    Exactly round(rate * N) samples, chosen uniformly at random, get a label drawn uniformly from the other
    num_classes - 1 classes (so `rate` is the share of wrong labels, not of redrawn ones). Deterministic in
    `seed` (its own generator: the global RNG is untouched); rate 0 returns the labels unchanged.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate must lie in [0, 1), got {rate}. Fix: e.g. --label_noise 0.2 for 20%")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{targets.min()}, {targets.max()}]")
    rng = np.random.default_rng([seed, 0x1abe1])  # a stream of its own, apart from the training seeds
    count = int(round(rate * targets.size))
    flipped = rng.choice(targets.size, size=count, replace=False)
    shift = rng.integers(1, num_classes, size=count)  # 1..C-1: never the true class
    noisy = targets.copy()
    noisy[flipped] = (targets[flipped] + shift) % num_classes
    mislabelled = np.zeros(targets.size, dtype=bool)
    mislabelled[flipped] = True
    return noisy, mislabelled


def apply_label_noise(dataset, rate: float, seed: int = 0) -> np.ndarray:
    """Replace a map-style dataset's labels in place by `symmetric_label_noise` (its `targets`, and `samples`
    for an ImageFolder) -> the mislabelled mask, bool [N]. The dataset needs `targets` and `classes`."""
    if not hasattr(dataset, "targets") or not hasattr(dataset, "classes"):
        raise ValueError(f"--label_noise needs a dataset with .targets and .classes, got {type(dataset).__name__}. "
                         "Fix: use the digits, CIFAR or an ImageFolder")
    noisy, mislabelled = symmetric_label_noise(dataset.targets, len(dataset.classes), rate, seed)
    dataset.targets = noisy.tolist()
    if hasattr(dataset, "samples"):  # ImageFolder reads (path, target) pairs
        dataset.samples = [(path, int(t)) for (path, _), t in zip(dataset.samples, noisy)]
        if hasattr(dataset, "imgs"):
            dataset.imgs = dataset.samples
    return mislabelled
