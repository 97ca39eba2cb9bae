"""Model input on the training device: the loader ships uint8 pixels, the device normalises them."""
from __future__ import annotations

from typing import Sequence

import torch

Stats = tuple[Sequence[float], Sequence[float]]  # per-channel (mean, std) in [0, 1] pixel units


class DeviceNormalize:
    """Move a batch to `device` and normalise it there, once.

    uint8 [B, C, H, W] (raw pixels from util.image_transforms) -> float32 [B, C, H, W] =
    (x / 255 - mean) / std, computed with the float32 operations of torchvision's ToTensor + Normalize
    in the same order, so on the CPU the result is bit-identical to the former CPU pipeline. A floating
    batch was normalised by its CPU transform (timm's fine-tuning augmentation, whose random erasing
    works in normalised units) and is only moved.

    mean/std are copied to the device once, here: a per-step copy from pageable memory would stall the
    host on CUDA.
    """

    def __init__(self, stats: Stats | None, device: torch.device | str):
        self.device = torch.device(device)
        self.mean = self.std = None
        if stats is not None:
            mean, std = stats
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(self.device)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(self.device)

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        samples = samples.to(self.device, non_blocking=True)
        if samples.is_floating_point():
            return samples
        if samples.dtype != torch.uint8:
            raise TypeError(f"image batches must be uint8 pixels or normalised floats, got {samples.dtype}")
        if self.mean is None:
            raise ValueError(
                "a uint8 image batch reached the engine without normalisation statistics. Fix: pass "
                "input_stats=util.datasets.dataset_stats(data_set) to the engine function"
            )
        # contiguous float32 [B, C, H, W] whatever the uint8 layout: the JPEG transforms ship channels-last
        # pixels (util.image_transforms._resize_crop), transposed here by the conversion copy itself
        out = torch.empty(samples.shape, dtype=torch.float32, device=self.device)
        return out.copy_(samples).div_(255).sub_(self.mean).div_(self.std)
