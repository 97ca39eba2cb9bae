"""timm's RandAugment and Mixup/CutMix with their numpy draws moved to seeded RNGs, so fine-tuning's
augmentation is a function of (seed, epoch, rank, position/step) and survives a restart with workers on.

timm draws RandAugment's op choice and Mixup's lambda, mode and CutMix box from numpy's global RNG. In a
DataLoader worker torch seeds that RNG once, when the worker starts, from the loader's base seed, so
persistent workers started by a resumed run replay the draws of the run's first epoch; in the training
process nobody seeds it. Here:
  SeededRandAugment  picks its ops with Python's `random`, which util.item_seeding.SeededItems seeds per item in
                     the workers (and which, with --num_workers 0, is the training process's checkpointed stream).
  SeededMixup        draws from a np.random.Generator that the engine reseeds every step from
                     (seed, STREAM_MIXUP, epoch, rank, step).
Both keep timm's distributions exactly; only the source of the random numbers changes.
"""
from __future__ import annotations

import random
from typing import Callable

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import numpy as np
import torch
from timm.data import Mixup
from timm.data.auto_augment import RandAugment

from util.item_seeding import STREAM_MIXUP


class SeededRandAugment(RandAugment):
    """timm's RandAugment whose op choice draws from Python's `random` instead of numpy's global RNG.

    Same distribution as timm's `np.random.choice(ops, num_layers, replace=choice_weights is None,
    p=choice_weights)`: uniform with replacement without weights; with weights, without replacement,
    i.e. successive draws from the weights of the ops not chosen yet, renormalised (what numpy's
    rejection of repeated draws amounts to). The ops themselves already draw from `random` (timm's AugmentOp).
    """

    def choose_ops(self) -> list:
        if self.choice_weights is None:
            return random.choices(self.ops, k=self.num_layers)
        ops, weights = list(self.ops), [float(w) for w in self.choice_weights]
        if self.num_layers > sum(w > 0 for w in weights):
            raise ValueError(f"RandAugment: {self.num_layers} ops per image without replacement, but only "
                             f"{sum(w > 0 for w in weights)} ops have a non-zero weight. Fix: lower n in --aa")
        chosen = []
        for _ in range(self.num_layers):
            i = random.choices(range(len(ops)), weights=weights)[0]
            chosen.append(ops.pop(i))
            weights.pop(i)
        return chosen

    def __call__(self, img):
        for op in self.choose_ops():
            img = op(img)
        return img


def seed_rand_augment(transform: Callable) -> Callable:
    """Replace every timm RandAugment inside `transform` (a Compose, nested or not) by a SeededRandAugment
    holding the same ops, layer count and weights. Returns `transform`, changed in place."""
    stack = [transform]
    while stack:
        t = stack.pop()
        children = getattr(t, "transforms", None)
        if isinstance(children, list):
            for i, child in enumerate(children):
                if type(child) is RandAugment:
                    children[i] = SeededRandAugment(child.ops, child.num_layers, choice_weights=child.choice_weights)
            stack.extend(children)
    return transform


class SeededMixup(Mixup):
    """timm's Mixup/CutMix drawing lambda, the mixup/cutmix switch and the CutMix box from `self.rng`.

    `reseed(epoch, step)` before each batch makes the draws a pure function of (seed, epoch, rank, step):
    a resumed run draws what the uninterrupted run drew, whatever happened before. Every method that
    draws a random number is overridden with the same distribution as timm's (np.random.rand ->
    Generator.random, beta -> beta, randint -> integers); the mixing arithmetic is timm's.
    """

    def __init__(self, *args, seed: int, rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.rank = int(seed), int(rank)
        self.rng = self.rng_for(0, 0)

    def rng_for(self, epoch: int, step: int, forward_only: bool = False) -> np.random.Generator:
        """forward_only: the draws of D3P's no-grad pass over pruned samples, a stream of their own."""
        words = [self.seed, STREAM_MIXUP, int(epoch), self.rank, int(step)] + ([1] if forward_only else [])
        return np.random.default_rng(words)

    def reseed(self, epoch: int, step: int, forward_only: bool = False) -> None:
        self.rng = self.rng_for(epoch, step, forward_only)

    # ---------------------------------------------------------------- parameters (timm's, from self.rng)
    def _params_per_elem(self, batch_size):
        rng = self.rng
        lam = np.ones(batch_size, dtype=np.float32)
        use_cutmix = np.zeros(batch_size, dtype=bool)
        if self.mixup_enabled:
            if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
                use_cutmix = rng.random(batch_size) < self.switch_prob
                lam_mix = np.where(
                    use_cutmix,
                    rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch_size),
                    rng.beta(self.mixup_alpha, self.mixup_alpha, size=batch_size))
            elif self.mixup_alpha > 0.:
                lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha, size=batch_size)
            elif self.cutmix_alpha > 0.:
                use_cutmix = np.ones(batch_size, dtype=bool)
                lam_mix = rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=batch_size)
            else:
                raise ValueError("Mixup: one of mixup_alpha > 0, cutmix_alpha > 0, cutmix_minmax set is required")
            lam = np.where(rng.random(batch_size) < self.mix_prob, lam_mix.astype(np.float32), lam)
        return lam, use_cutmix

    def _params_per_batch(self):
        rng = self.rng
        lam = 1.
        use_cutmix = False
        if self.mixup_enabled and rng.random() < self.mix_prob:
            if self.mixup_alpha > 0. and self.cutmix_alpha > 0.:
                use_cutmix = bool(rng.random() < self.switch_prob)
                lam_mix = rng.beta(self.cutmix_alpha, self.cutmix_alpha) if use_cutmix else \
                    rng.beta(self.mixup_alpha, self.mixup_alpha)
            elif self.mixup_alpha > 0.:
                lam_mix = rng.beta(self.mixup_alpha, self.mixup_alpha)
            elif self.cutmix_alpha > 0.:
                use_cutmix = True
                lam_mix = rng.beta(self.cutmix_alpha, self.cutmix_alpha)
            else:
                raise ValueError("Mixup: one of mixup_alpha > 0, cutmix_alpha > 0, cutmix_minmax set is required")
            lam = float(lam_mix)
        return lam, use_cutmix

    def cutmix_bbox_and_lam(self, img_shape, lam):
        """timm.data.mixup.cutmix_bbox_and_lam (rand_bbox with margin 0, or rand_bbox_minmax) from self.rng.
        Returns ((y_low, y_high, x_low, x_high), lam corrected to the box's area)."""
        rng = self.rng
        img_h, img_w = img_shape[-2:]
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            cut_h = int(rng.integers(int(img_h * lo), int(img_h * hi)))
            cut_w = int(rng.integers(int(img_w * lo), int(img_w * hi)))
            yl = int(rng.integers(0, img_h - cut_h + 1))
            xl = int(rng.integers(0, img_w - cut_w + 1))
            yh, xh = yl + cut_h, xl + cut_w
        else:
            ratio = np.sqrt(1 - lam)
            cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
            cy, cx = int(rng.integers(0, img_h)), int(rng.integers(0, img_w))
            yl, yh = int(np.clip(cy - cut_h // 2, 0, img_h)), int(np.clip(cy + (cut_h + 1) // 2, 0, img_h))
            xl, xh = int(np.clip(cx - cut_w // 2, 0, img_w)), int(np.clip(cx + (cut_w + 1) // 2, 0, img_w))
        if self.correct_lam or self.cutmix_minmax is not None:
            lam = 1. - (yh - yl) * (xh - xl) / float(img_h * img_w)
        return (yl, yh, xl, xh), lam

    # ------------------------------------------------- timm's mixing, with the box drawn from self.rng
    def _mix_elem(self, x):
        return self._mix_rows(x, pairs=False)

    def _mix_pair(self, x):
        return self._mix_rows(x, pairs=True)

    def _mix_rows(self, x, pairs: bool):
        """timm's 'elem' mode (row i mixed with row B-1-i) and 'pair' mode (both rows of each pair mixed with
        the pair's one lambda): the same draws in the same order as timm's _mix_elem/_mix_pair."""
        batch_size = len(x)
        rows = batch_size // 2 if pairs else batch_size
        lam_batch, use_cutmix = self._params_per_elem(rows)
        x_orig = x.clone()
        for i in range(rows):
            j = batch_size - i - 1
            lam = lam_batch[i]
            if lam == 1.:
                continue
            if use_cutmix[i]:
                (yl, yh, xl, xh), lam = self.cutmix_bbox_and_lam(x[i].shape, lam)
                x[i][:, yl:yh, xl:xh] = x_orig[j][:, yl:yh, xl:xh]
                if pairs:
                    x[j][:, yl:yh, xl:xh] = x_orig[i][:, yl:yh, xl:xh]
                lam_batch[i] = lam
            else:
                x[i] = x[i] * lam + x_orig[j] * (1 - lam)
                if pairs:
                    x[j] = x[j] * lam + x_orig[i] * (1 - lam)
        if pairs:
            lam_batch = np.concatenate((lam_batch, lam_batch[::-1]))
        return torch.tensor(lam_batch, device=x.device, dtype=x.dtype).unsqueeze(1)

    def _mix_batch(self, x):
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.:
            return 1.
        if use_cutmix:
            (yl, yh, xl, xh), lam = self.cutmix_bbox_and_lam(x.shape, lam)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        else:
            x_flipped = x.flip(0).mul_(1. - lam)
            x.mul_(lam).add_(x_flipped)
        return lam
