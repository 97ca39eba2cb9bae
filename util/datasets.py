"""Data sets. Every training item is (image, target, dataset_index).

`--data_set`:
  digits           the embedded default: scikit-learn's 1,797 real 8x8 digit images, upscaled to
                   32x32 RGB, fixed train/val split (no download, no path needed).
  imagenet|folder  ImageFolder at --data_path with train/ and val/.
  cifar10|cifar100 torchvision CIFAR at --data_path (downloads only with --download).

Their transforms are in util.image_transforms, the loaders' seeding in util.item_seeding, collation and the
worker count in util.loader.
"""
from __future__ import annotations

import os
from typing import Callable

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from util.data_errors import CorruptImageError, DatasetError
from util.image_io import checked_loader, lazy_loader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_SETS = ("digits", "imagenet", "folder", "cifar10", "cifar100")
IN_MEMORY_DATA_SETS = ("digits", "cifar10", "cifar100")  # decoded once into memory; the rest are image folders
DIGITS_VAL_SIZE = 297  # 1,500 train / 297 val; fixed permutation below


class IndexedDataset(Dataset):
    """Wrap a dataset so each item also carries its dataset index through the DataLoader.

    With `skip_corrupt`, an unreadable image is replaced by the next readable one and its index is
    returned negated minus one (-1 - index) so that the engine counts it and records no loss for it.
    """

    def __init__(self, base: Dataset, skip_corrupt: bool = False):
        self.base = base
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        try:
            img, target = self.base[index]
            return img, target, index
        except CorruptImageError:
            if not self.skip_corrupt:
                raise
        for offset in range(1, min(len(self.base), 64)):
            try:
                img, target = self.base[(index + offset) % len(self.base)]
                return img, target, -1 - index
            except CorruptImageError:
                continue
        raise DatasetError(f"64 consecutive unreadable images from index {index}: the dataset looks broken")

    @property
    def targets(self):
        return getattr(self.base, "targets", None)

    @property
    def classes(self):  # num_classes_of reads it: a subset's labels need not reach the last class
        return getattr(self.base, "classes", None)



def _image_folder(root: str, transform: Callable | None) -> tv_datasets.ImageFolder:
    if not os.path.isdir(root):
        raise DatasetError(
            f"dataset folder {root} does not exist. Fix: --data_path must contain train/ and val/ "
            "with one sub-folder of images per class (ImageNet layout)"
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders. Fix: put images in {root}/<class_name>/")
    exts = tuple(tv_datasets.folder.IMG_EXTENSIONS)
    for c in classes:
        has_image = False
        for dirpath, _, files in os.walk(os.path.join(root, c), followlinks=True):
            if any(f.lower().endswith(exts) for f in files):
                has_image = True
                break
        if not has_image:
            raise DatasetError(
                f"class folder {os.path.join(root, c)} has no images ({', '.join(exts)}). "
                "Fix: add images or remove the empty folder"
            )
    loader = lazy_loader if getattr(transform, "decodes_lazily", False) else checked_loader
    return tv_datasets.ImageFolder(root, transform=transform, loader=loader)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits (1,797 real scans), as 32x32 RGB PIL images with labels 0-9.

    The train/val split is fixed (a permutation from a fixed seed), identical on every machine.
    """

    def __init__(self, train: bool, transform: Callable | None = None):
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(0).permutation(len(digits.target))
        idx = order[DIGITS_VAL_SIZE:] if train else order[:DIGITS_VAL_SIZE]
        # 0..16 grey levels -> 0..255, upscaled with bilinear filtering to the 32x32 the tiny models use
        pixels = (digits.images[idx] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.images = [Image.fromarray(p, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB") for p in pixels]
        self.targets = digits.target[idx].astype(np.int64).tolist()
        self.transform = transform
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class _CIFAR10(tv_datasets.CIFAR10):
    """torchvision's CIFAR-10 without its md5 of every batch file at each construction (a full read of the
    163 MB at every start, twice per run); the pickles are still parsed and --download still checks the
    archive's md5. It also lets tests build a small CIFAR in the same pickle format."""

    train_list = [[name, None] for name, _ in tv_datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in tv_datasets.CIFAR10.test_list]
    meta = {**tv_datasets.CIFAR10.meta, "md5": None}


class _CIFAR100(tv_datasets.CIFAR100):
    """CIFAR-100 as `_CIFAR10`."""

    train_list = [[name, None] for name, _ in tv_datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in tv_datasets.CIFAR100.test_list]
    meta = {**tv_datasets.CIFAR100.meta, "md5": None}


def resolve_data_set(data_set: str | None, data_path: str | None) -> str:
    """`--data_set` default: digits without a --data_path, imagenet layout with one."""
    if data_set:
        return data_set
    return "imagenet" if data_path else "digits"


def build_dataset(split: str, data_set: str | None, data_path: str | None, transform: Callable | None,
                  download: bool = False) -> Dataset:
    """split 'train' or 'val' of `data_set` (None: resolve_data_set's default) under `data_path`.
    Raises DatasetError with a fix when the data is missing or empty."""
    name = resolve_data_set(data_set, data_path)
    train = split == "train"
    if name == "digits":
        return DigitsDataset(train=train, transform=transform)
    if not data_path:
        raise DatasetError(f"--data_set {name} needs --data_path (leave both out to use the embedded digits)")
    if not os.path.isdir(data_path):
        raise DatasetError(f"--data_path {data_path} does not exist. Fix: point it at the dataset root")
    if name in ("imagenet", "folder"):
        return _image_folder(os.path.join(data_path, split), transform)
    if name in ("cifar10", "cifar100"):
        cls = _CIFAR10 if name == "cifar10" else _CIFAR100
        try:
            return cls(data_path, train=train, transform=transform, download=download)
        except RuntimeError as exc:
            raise DatasetError(
                f"{name} not found under {data_path} ({exc}). Fix: extract the python version of "
                f"{name} there, or pass --download on a machine with internet access"
            ) from exc
    raise DatasetError(f"unknown --data_set {name}; choose one of {', '.join(DATA_SETS)}")


def dataset_stats(data_set: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std of a (resolved) data set: ImageNet's for photos, 0.5 for the grey digits."""
    if data_set == "digits":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return IMAGENET_MEAN, IMAGENET_STD


def num_classes_of(dataset: Dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    return int(max(dataset.targets)) + 1
