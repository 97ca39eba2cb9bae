"""Datasets and transforms. Every training item is (image, target, dataset_index).

`--data_set`:
  digits           the embedded default: scikit-learn's 1,797 real 8x8 digit images, upscaled to
                   32x32 RGB, fixed train/val split (no download, no path needed).
  imagenet|folder  ImageFolder at --data_path with train/ and val/.
  cifar10|cifar100 torchvision CIFAR at --data_path (downloads only with --download).
"""
from __future__ import annotations

import math
import os
import random
from typing import Callable, Iterator

import util  # noqa: F401  (torchvision op schemas, before torchvision)

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate, get_worker_info
from torchvision import datasets as tv_datasets
from torchvision import transforms

try:  # libjpeg-turbo straight into a numpy array: ~1/3 less CPU per JPEG than PIL's decode + convert
    import simplejpeg
except ImportError:  # optional: PIL decodes everything without it
    simplejpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_SETS = ("digits", "imagenet", "folder", "cifar10", "cifar100")
DIGITS_VAL_SIZE = 297  # 1,500 train / 297 val; fixed permutation below


class DatasetError(RuntimeError):
    """A dataset problem the user must fix; the message names the problem and the fix."""


class CorruptImageError(DatasetError):
    pass


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
        first = int(getattr(self.base, "skipped", 0))
        for position, index in enumerate(self.base, start=first):
            yield int(index), (key + position) % (1 << 63)

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
_DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def _corrupt_image_error(path: str, exc: Exception) -> CorruptImageError:
    return CorruptImageError(
        f"cannot read image {path}: {exc}. Fix: remove or replace the file, or pass --skip_corrupt "
        "to replace unreadable images by their neighbour and count them in log.txt"
    )


def _checked_loader(path: str) -> Image.Image:
    """PIL loader that names the file when an image cannot be decoded."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            return img.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise _corrupt_image_error(path, exc) from exc


class EncodedJpeg:
    """A JPEG file's bytes and header, not yet decoded: what `_lazy_loader` gives the uint8 transforms
    for a colour or greyscale JPEG when simplejpeg is installed. `size` is (width, height), as PIL's."""

    __slots__ = ("path", "data", "size")

    def __init__(self, path: str, data: bytes, size: tuple[int, int]):
        self.path, self.data, self.size = path, data, size


_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")  # decoded to RGB by simplejpeg; CMYK/YCCK go to PIL


def _lazy_loader(path: str) -> Image.Image | EncodedJpeg:
    """Open an image without decoding it: the uint8 transforms below decode it, at reduced size where
    their crop allows, and name the file if decoding fails.

    A JPEG that simplejpeg can decode (colour or greyscale) is read once into an EncodedJpeg, its size
    from simplejpeg's header parser (~1 us, where PIL's open costs ~20 us); anything else, or a header
    simplejpeg rejects, is opened by PIL (header only).
    """
    if simplejpeg is not None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise _corrupt_image_error(path, exc) from exc
        if data[:2] == b"\xff\xd8":  # JPEG's start-of-image marker
            try:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                pass  # PIL below names the file if it cannot read it either
            else:
                if colorspace in _SIMPLEJPEG_COLORSPACES:
                    return EncodedJpeg(path, data, (width, height))
    try:
        return Image.open(path)
    except _DECODE_ERRORS as exc:
        raise _corrupt_image_error(path, exc) from exc


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
    loader = _lazy_loader if getattr(transform, "decodes_lazily", False) else _checked_loader
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


def resolve_data_set(args) -> str:
    """`--data_set` default: digits without a --data_path, imagenet layout with one."""
    if args.data_set:
        return args.data_set
    return "imagenet" if args.data_path else "digits"


def build_dataset(split: str, args, transform: Callable | None) -> Dataset:
    """split 'train' or 'val'. Raises DatasetError with a fix when the data is missing or empty."""
    name = resolve_data_set(args)
    train = split == "train"
    if name == "digits":
        return DigitsDataset(train=train, transform=transform)
    if not args.data_path:
        raise DatasetError(f"--data_set {name} needs --data_path (leave both out to use the embedded digits)")
    if not os.path.isdir(args.data_path):
        raise DatasetError(f"--data_path {args.data_path} does not exist. Fix: point it at the dataset root")
    if name in ("imagenet", "folder"):
        return _image_folder(os.path.join(args.data_path, split), transform)
    if name in ("cifar10", "cifar100"):
        cls = _CIFAR10 if name == "cifar10" else _CIFAR100
        try:
            return cls(args.data_path, train=train, transform=transform, download=getattr(args, "download", False))
        except RuntimeError as exc:
            raise DatasetError(
                f"{name} not found under {args.data_path} ({exc}). Fix: extract the python version of "
                f"{name} there, or pass --download on a machine with internet access"
            ) from exc
    raise DatasetError(f"unknown --data_set {name}; choose one of {', '.join(DATA_SETS)}")


def dataset_stats(args) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std: ImageNet's for photos, 0.5 for the grey digits."""
    if resolve_data_set(args) == "digits":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return IMAGENET_MEAN, IMAGENET_STD


# ------------------------------------------------------------------------------------------ transforms
# Every transform below returns uint8 [3, S, S] tensors: a quarter of the bytes of float32 through the
# worker queues, pinned memory and the host-to-device copy. The engines normalise on the training
# device (util.device_input.DeviceNormalize), with the float32 operations of ToTensor + Normalize.
# In-memory data sets (digits, CIFAR) use torchvision's PIL ops, so their pixels are those of the float
# pipeline exactly; image folders use the uint8 ops below, which decode and resize far less.

IN_MEMORY_DATA_SETS = ("digits", "cifar10", "cifar100")
JPEG_DCT_SCALES = (8, 4, 2)  # libjpeg decodes at 1/8, 1/4, 1/2 size natively (PIL's draft mode)
JPEG_UPSAMPLING = ("fast", "fancy")  # --jpeg_upsampling: chroma upsampling of training crops (_decode_pixels)


# F.interpolate(mode="bicubic", antialias=True) is this op (in torch since 1.11) behind ~10 us of argument
# checks (1% of a sample; torch.ops.aten's Python dispatch costs 15 us), and only the op takes `out=`
_BICUBIC_AA = torch._C._nn._upsample_bicubic2d_aa  # (input, (h, w), align_corners, scale_h, scale_w, out=)


def hwc_tensor(height: int, width: int) -> torch.Tensor:
    """An empty uint8 image [3, height, width] laid out in memory as [height, width, 3] (channels-last):
    the layout of every uint8 transform's output (see _resize_crop)."""
    return torch.empty(height, width, 3, dtype=torch.uint8).permute(2, 0, 1)


def _decode_reduced(img: Image.Image, max_reduction: float) -> tuple[Image.Image, float]:
    """Decode a lazily opened image at the smallest JPEG DCT scale 1/k with k <= max_reduction.

    Returns (RGB image, k): a pixel (x, y) of the original is at (x / k, y / k) in the result. k is 1
    when the image is not a JPEG, is already decoded, or the crop needs full resolution.
    """
    path = getattr(img, "filename", "") or "<in-memory image>"
    width, height = img.size
    reduction = next((k for k in JPEG_DCT_SCALES if k <= max_reduction), 1)
    factor = 1.0
    try:
        if reduction > 1:
            drafted = img.draft("RGB", (width // reduction, height // reduction))
            if drafted is not None:  # None: not a JPEG, or already decoded
                factor = width / drafted[1][2]
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise _corrupt_image_error(path, exc) from exc
    return img, factor


def _decode_pixels(img: Image.Image | EncodedJpeg, max_reduction: float,
                   fast_upsampling: bool = False) -> tuple[np.ndarray, float]:
    """Decode a lazily opened image -> (uint8 [H, W, 3] RGB array, k), as `_decode_reduced`.

    A baseline or progressive JPEG in colour (YCbCr) or greyscale is decoded by simplejpeg when it is
    installed: the same libjpeg-turbo with the same accurate IDCT and upsampling as PIL (bit-identical
    pixels, DCT scaling included), without PIL's image object and convert copy. Everything else (other
    formats, CMYK, a file simplejpeg rejects: truncated, corrupt) goes through PIL, whose errors name
    the file (CorruptImageError).

    fast_upsampling: libjpeg's merged upsampler for the half-resolution chroma of a 4:2:0/4:2:2 JPEG
    (each chroma sample repeated over its 2x2 or 2x1 pixels, fused with the colour conversion) instead
    of its default triangle filter: ~6% less decode time. Luma and the IDCT are untouched, so pixels
    differ only where colour changes within 2 pixels; after a random resized crop to 224 that is 0.4
    levels on average and no shift of the channel means (tests/test_loader_pipeline.py). PIL has no such
    switch: its fallback decodes are always the default ones.
    """
    if isinstance(img, EncodedJpeg):
        data, path = img.data, img.path
    else:
        fp = getattr(img, "fp", None)
        usable = simplejpeg is not None and img.format == "JPEG" and img.mode in ("RGB", "L") and fp is not None
        data, path = None, None
        if usable:
            try:
                fp.seek(0)
                data = fp.read()
            except OSError:
                data = None  # PIL reports it below, naming the file
    if data is not None:
        width, height = img.size
        reduction = next((k for k in JPEG_DCT_SCALES if k <= max_reduction), 1)
        scaled = (-(-height // reduction), -(-width // reduction))  # libjpeg's size at scale 1/k: ceil
        try:
            # at least ceil(side / k) pixels: libjpeg's smallest scale M/8 that gives that is exactly 1/k
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=scaled[1], min_height=scaled[0],
                                            fastupsample=fast_upsampling)
        except (OSError, ValueError):
            pass  # PIL decodes it below, or raises CorruptImageError naming the file
        else:
            if pixels.shape[:2] == scaled:  # pixel (x, y) of the original at (x / k, y / k), as with PIL
                if path is None:
                    img.close()
                return pixels, float(reduction)
    if path is not None:  # an EncodedJpeg simplejpeg rejected: PIL's turn
        try:
            img = Image.open(path)
        except _DECODE_ERRORS as exc:
            raise _corrupt_image_error(path, exc) from exc
    img, k = _decode_reduced(img, max_reduction)
    return np.array(img), k  # writable, as torch.from_numpy wants


def _resample_box(pixels: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> torch.Tensor:
    """The region `box` (left, top, right, bottom, in pixels) of an RGB uint8 [H, W, 3] array, resampled
    to size (h, w) with antialiased bicubic -> uint8 [3, h, w] in [h, w, 3] memory (as _resize_crop).

    A box on whole pixels is cropped and resized by torch's uint8 kernel (PIL's filter, 3-4x faster
    than PIL's resize; only rounding differs, 0.005 levels on average on the test photos). A box in between pixels (after
    DCT scaling) is resized by PIL, whose box may be fractional: rounding it would shift the crop by up
    to half a pixel.
    """
    if all(float(v).is_integer() for v in box):
        left, top, right, bottom = (int(v) for v in box)
        return _resize_crop(pixels, top, left, bottom - top, right - left, size)
    out = Image.fromarray(pixels).resize((size[1], size[0]), Image.BICUBIC, box=box)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)  # [3, h, w] in HWC memory, as _resize_crop


def _resize_crop(pixels: np.ndarray, top: int, left: int, height: int, width: int,
                 size: tuple[int, int]) -> torch.Tensor:
    """pixels[top:top+height, left:left+width] of an RGB uint8 [H, W, 3] array resized to size (h, w) by
    torch's uint8 antialiased bicubic kernel -> uint8 [3, h, w] in [h, w, 3] memory (channels-last).

    Channels-last out because the kernel computes in that layout: asked for a contiguous [3, h, w] (its
    choice for a single image) it transposes its result, 25% of its time at 224 px (measured). The
    transposition happens on the training device instead, inside the float conversion that
    util.device_input.DeviceNormalize does anyway; collate_indexed keeps the layout (a plain copy).
    """
    # the box as a strided view, no copy: the kernel reads it as fast as a dense block (measured on the
    # benchmark's crops; copying it first cost as much as it saved)
    batch = torch.from_numpy(pixels[top:top + height, left:left + width]).permute(2, 0, 1).unsqueeze(0)
    out = hwc_tensor(*size)
    if (height, width) == size:
        return out.copy_(batch[0])
    _BICUBIC_AA(batch, size, False, None, None, out=out.unsqueeze(0))
    return out


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            log_ratio: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params for an image of height x width -> (top, left, h, w).

    The same torch RNG calls in the same order (uniform area, exp of a uniform log-aspect, two randint;
    up to 10 tries, then the same central crop), so the same boxes and RNG state after, without its
    per-call image inspection and log(ratio) tensor. `log_ratio` must be torch.log(torch.tensor(ratio))
    as Python floats (float32 values, as torchvision passes them to uniform_).
    """
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).exp_().item()  # float32 exp
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    in_ratio = float(width) / float(height)  # no box fitted: the central crop, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCropUint8:
    """MAE's RandomResizedCrop(size, scale, bicubic) [+ RandomHorizontalFlip] -> uint8 [3, size, size].

    The box and the flip are drawn by torchvision's own rule (RandomResizedCrop.get_params as
    random_resized_crop_box, then torch.rand(1) < 0.5) from the same torch RNG, in the same order, as
    the float pipeline: the same seed gives the same boxes and flips, and loader seeding and resume are
    unchanged. The work is less: the JPEG is decoded at 1/2, 1/4 or 1/8 size when the box is still
    >= size pixels wide and tall at that scale, only the box is resized, and the result stays uint8.
    fast_upsampling: libjpeg's merged chroma upsampler (see _decode_pixels); False decodes as PIL does.
    """

    decodes_lazily = True  # _image_folder passes an opened, not yet decoded image (or EncodedJpeg)

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, fast_upsampling: bool = False):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip
        self.fast_upsampling = fast_upsampling
        self.log_ratio = tuple(torch.log(torch.tensor(ratio)).tolist())  # float32, as torchvision draws them

    def __call__(self, img: Image.Image | EncodedJpeg) -> torch.Tensor:
        image_width, image_height = img.size
        top, left, height, width = random_resized_crop_box(image_height, image_width, self.scale,
                                                           self.log_ratio, self.ratio)
        flip = self.flip and torch.rand(1).item() < 0.5  # float32 vs 0.5 as torchvision's tensor compare
        pixels, k = _decode_pixels(img, min(width, height) / self.size, self.fast_upsampling)
        box = (left / k, top / k, (left + width) / k, (top + height) / k)  # in decoded pixels
        out = _resample_box(pixels, box, (self.size, self.size))
        return out.flip(-1) if flip else out  # flip: a copy of 150 KB in the same layout (~5 us)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip}, "
                f"fast_upsampling={self.fast_upsampling})")


class ResizeCenterCropUint8:
    """Resize(resize, bicubic) + CenterCrop(size) -> uint8 [3, size, size], decoding the JPEG at reduced
    size when the resized image is at most that large. Output sizes and crop offsets follow torchvision's."""

    decodes_lazily = True

    def __init__(self, resize: int, size: int):
        self.resize, self.size = resize, size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        width, height = img.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.resize * long / short)  # torchvision's rule for Resize(int)
        new_w, new_h = (self.resize, new_long) if width <= height else (new_long, self.resize)
        pixels, k = _decode_pixels(img, min(width / new_w, height / new_h))
        out = _resample_box(pixels, (0, 0, width / k, height / k), (new_h, new_w))
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        centre = hwc_tensor(self.size, self.size)  # channels-last, as every uint8 transform's output
        return centre.copy_(out[:, top:top + self.size, left:left + self.size])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, size={self.size})"


def train_crop_transform(args, scale: tuple[float, float]) -> Callable:
    """RandomResizedCrop(scale, bicubic) + horizontal flip -> uint8 (MAE's pre-training and linear-probe
    augmentation). Digits are not flipped (a mirrored digit is another shape) and crop less: scale
    (0.6, 1). JPEG folders decode with `args.jpeg_upsampling` ("fast" when absent): a random crop's
    resampling moves pixels far more than the chroma filter does, so training crops take the faster one;
    evaluation (eval_transform) always decodes as PIL does."""
    name = resolve_data_set(args)
    if name == "digits":
        scale = (0.6, 1.0)
    if name in IN_MEMORY_DATA_SETS:
        ops = [transforms.RandomResizedCrop(args.input_size, scale=scale,
                                            interpolation=transforms.InterpolationMode.BICUBIC)]
        if name != "digits":
            ops.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(ops + [transforms.PILToTensor()])
    upsampling = getattr(args, "jpeg_upsampling", "fast")
    if upsampling not in JPEG_UPSAMPLING:
        raise ValueError(f"--jpeg_upsampling {upsampling!r}: choose one of {', '.join(JPEG_UPSAMPLING)}")
    return RandomResizedCropUint8(args.input_size, scale=scale, flip=True, fast_upsampling=upsampling == "fast")


def pretrain_transform(args) -> Callable:
    """MAE's pre-training augmentation: random resized crop (scale 0.2-1), flip -> uint8 [3, S, S]."""
    return train_crop_transform(args, scale=(0.2, 1.0))


def eval_transform(args) -> Callable:
    """Resize (to input/0.875, or as-is for small inputs), centre crop -> uint8 [3, S, S]."""
    size = args.input_size
    resize = size if size <= 32 else int(size / 0.875)
    if resolve_data_set(args) in IN_MEMORY_DATA_SETS:
        return transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.PILToTensor(),
        ])
    return ResizeCenterCropUint8(resize, size)


def finetune_transform(is_train: bool, args) -> Callable:
    """Fine-tuning transforms: timm's RandAugment + random erasing for training, centre crop for eval.

    The training transform ends in float32 normalised on the CPU (erasing draws normal noise in
    normalised units); eval is uint8 (centre crop), normalised on the device. RandAugment picks its ops
    with Python's `random` (util.augment.SeededRandAugment), which SeededItems seeds per item, instead of
    numpy's global RNG: exact after a restart with persistent workers."""
    if not is_train:
        return eval_transform(args)
    from timm.data import create_transform

    mean, std = dataset_stats(args)
    transform = create_transform(
        input_size=args.input_size,
        is_training=True,
        color_jitter=getattr(args, "color_jitter", None),
        auto_augment=getattr(args, "aa", None),
        interpolation="bicubic",
        re_prob=getattr(args, "reprob", 0.0),
        re_mode=getattr(args, "remode", "pixel"),
        re_count=getattr(args, "recount", 1),
        mean=mean,
        std=std,
        hflip=0.0 if resolve_data_set(args) == "digits" else 0.5,
        scale=(0.6, 1.0) if resolve_data_set(args) == "digits" else (0.08, 1.0),
    )
    from util.augment import seed_rand_augment

    return seed_rand_augment(_safe_posterize_ops(transform))


def _posterize_keeping_zero_bits(img, bits_to_keep, **__):
    """timm's RandAugment posterize for Pillow >= 11, which rejects keeping < 1 bit: 0 bits gives the
    black image older Pillow returned. Without it MAE's rand-m9-mstd0.5-inc1 raises ValueError
    whenever 'PosterizeIncreasing' draws a magnitude >= 10 (a few images per epoch)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def _safe_posterize_ops(transform):
    """Point this transform's own posterize ops at `_posterize_keeping_zero_bits` (timm is untouched)."""
    from timm.data.auto_augment import AugmentOp, posterize

    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, AugmentOp) and t.aug_fn is posterize:
            t.aug_fn = _posterize_keeping_zero_bits
        stack.extend(getattr(t, "transforms", None) or [])
        stack.extend(getattr(t, "ops", None) or [])
    return transform


def num_classes_of(dataset: Dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    return int(max(dataset.targets)) + 1


def collate_indexed(batch):
    """Default collation, kept explicit so the index column stays an int64 tensor (images keep their
    dtype: uint8 from the transforms above, float32 from timm's fine-tuning transform).

    Images in channels-last memory (the JPEG transforms above) are stacked as [B, H, W, C] and returned
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
