"""The examples' data: scikit-learn's 8x8 digit scans (embedded, no download) or an ImageFolder."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset


def digit_images(input_size: int = 16, subset: int = 0) -> tuple[Dataset, Dataset, int]:
    """(train, val, classes): digits as float [3, S, S] images in [-1, 1], labels int64; a fixed split of
    1500 train / 297 val samples (train: the first `subset` only, when given)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None].div(8).sub(1).expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=input_size, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    train, val = order[297:], order[:297]
    if subset:
        train = train[:subset]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), 10


def image_folders(root: str, input_size: int) -> tuple[Dataset, Dataset, int]:
    """(train, val, classes) of ROOT/train and ROOT/val (torchvision ImageFolder, ImageNet-style transforms)."""
    from util.torchvision_compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # this repository's shim for CPU-only torch; drop it in your project
    from torchvision import datasets as tvd, transforms as T

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = tvd.ImageFolder(os.path.join(root, "train"), T.Compose(
        [T.RandomResizedCrop(input_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    val = tvd.ImageFolder(os.path.join(root, "val"), T.Compose(
        [T.Resize(int(input_size * 8 / 7)), T.CenterCrop(input_size), T.ToTensor(), norm]))
    return train, val, len(train.classes)


def digit_sequences(subset: int = 0) -> tuple[torch.Tensor, int]:
    """A token corpus from the digits, for the causal-LM example: each scan's 64 pixels (intensities 0..16,
    tokens 1..17) after a class token (18 + label), BOS 0 first -> int64 [1500 or subset, 66], vocabulary 28.
    The same train split as `digit_images`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))[297:]
    if subset:
        order = order[:subset]
    pixels = torch.tensor(digits.images[order].reshape(len(order), 64), dtype=torch.int64) + 1
    label = torch.tensor(digits.target[order], dtype=torch.int64)[:, None] + 18
    return torch.cat([torch.zeros_like(label), label, pixels], dim=1), 28


def timm_kwargs(model: str, input_size: int) -> dict:
    """Size a timm `vit_tiny*` for small inputs: 4-pixel patches and 4 blocks of width 96 (the 16-pixel digits then
    train 10 epochs on a CPU in about a minute); other models keep timm's defaults."""
    if not model.startswith("vit_tiny"):
        return {}
    return dict(img_size=input_size, patch_size=4, depth=4, embed_dim=96, num_heads=3)
