"""The image transforms of each recipe: uint8 [3, S, S] out, normalised later on the training device.

Every transform here returns uint8 [3, S, S] tensors: a quarter of the bytes of float32 through the
worker queues, pinned memory and the host-to-device copy. The engines normalise on the training
device (util.device_input.DeviceNormalize), with the float32 operations of ToTensor + Normalize.
In-memory data sets (digits, CIFAR) use torchvision's PIL ops, so their pixels are those of the float
pipeline exactly; image folders use the uint8 ops below, which decode (util.image_io) and resize far less.
The one exception is fine-tuning's training transform (timm's RandAugment + random erasing): float32,
normalised on the CPU.

The recipes take what they use: the (resolved) data set name, the input size, and their own options.
"""
from __future__ import annotations

import math
from typing import Callable

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from util.augment import seed_rand_augment
from util.datasets import IN_MEMORY_DATA_SETS, dataset_stats
from util.image_io import EncodedJpeg, decode_pixels

JPEG_UPSAMPLING = ("fast", "fancy")  # --jpeg_upsampling: chroma upsampling of training crops (decode_pixels)


# F.interpolate(mode="bicubic", antialias=True) is this op (in torch since 1.11) behind ~10 us of argument
# checks (1% of a sample; torch.ops.aten's Python dispatch costs 15 us), and only the op takes `out=`
_BICUBIC_AA = torch._C._nn._upsample_bicubic2d_aa  # (input, (h, w), align_corners, scale_h, scale_w, out=)


def hwc_tensor(height: int, width: int) -> torch.Tensor:
    """An empty uint8 image [3, height, width] laid out in memory as [height, width, 3] (channels-last):
    the layout of every uint8 transform's output (see _resize_crop)."""
    return torch.empty(height, width, 3, dtype=torch.uint8).permute(2, 0, 1)


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
    fast_upsampling: libjpeg's merged chroma upsampler (see util.image_io.decode_pixels); False decodes as PIL does.
    """

    decodes_lazily = True  # util.datasets passes an opened, not yet decoded image (or EncodedJpeg)

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
        pixels, k = decode_pixels(img, min(width, height) / self.size, self.fast_upsampling)
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
        pixels, k = decode_pixels(img, min(width / new_w, height / new_h))
        out = _resample_box(pixels, (0, 0, width / k, height / k), (new_h, new_w))
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        centre = hwc_tensor(self.size, self.size)  # channels-last, as every uint8 transform's output
        return centre.copy_(out[:, top:top + self.size, left:left + self.size])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, size={self.size})"


def crop_transform(data_set: str, input_size: int, scale: tuple[float, float],
                   jpeg_upsampling: str = "fast") -> Callable:
    """RandomResizedCrop(scale, bicubic) + horizontal flip -> uint8 [3, input_size, input_size] (MAE's
    pre-training and linear-probe augmentation). Digits are not flipped (a mirrored digit is another shape)
    and crop less: scale (0.6, 1). JPEG folders decode with `jpeg_upsampling` (--jpeg_upsampling): a random
    crop's resampling moves pixels far more than the chroma filter does, so training crops take the faster
    one; evaluation (eval_transform) always decodes as PIL does."""
    if data_set == "digits":
        scale = (0.6, 1.0)
    if data_set in IN_MEMORY_DATA_SETS:
        ops = [transforms.RandomResizedCrop(input_size, scale=scale,
                                            interpolation=transforms.InterpolationMode.BICUBIC)]
        if data_set != "digits":
            ops.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(ops + [transforms.PILToTensor()])
    if jpeg_upsampling not in JPEG_UPSAMPLING:
        raise ValueError(f"--jpeg_upsampling {jpeg_upsampling!r}: choose one of {', '.join(JPEG_UPSAMPLING)}")
    return RandomResizedCropUint8(input_size, scale=scale, flip=True, fast_upsampling=jpeg_upsampling == "fast")


def pretrain_transform(data_set: str, input_size: int, jpeg_upsampling: str = "fast") -> Callable:
    """MAE's pre-training augmentation: random resized crop (scale 0.2-1), flip -> uint8 [3, S, S]."""
    return crop_transform(data_set, input_size, (0.2, 1.0), jpeg_upsampling)


def eval_transform(data_set: str, input_size: int) -> Callable:
    """Resize (to input/0.875, or as-is for small inputs), centre crop -> uint8 [3, S, S]."""
    resize = input_size if input_size <= 32 else int(input_size / 0.875)
    if data_set in IN_MEMORY_DATA_SETS:
        return transforms.Compose([
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size),
            transforms.PILToTensor(),
        ])
    return ResizeCenterCropUint8(resize, input_size)


def finetune_train_transform(data_set: str, input_size: int, *, auto_augment: str | None = None,
                             color_jitter: float | None = None, reprob: float = 0.0, remode: str = "pixel",
                             recount: int = 1) -> Callable:
    """Fine-tuning's training transform: timm's RandAugment (`auto_augment`, e.g. MAE's
    "rand-m9-mstd0.5-inc1") + random erasing -> float32 [3, S, S], normalised on the CPU (erasing draws
    normal noise in normalised units). Evaluation uses eval_transform.

    RandAugment picks its ops with Python's `random` (util.augment.SeededRandAugment), which
    util.item_seeding.SeededItems seeds per item, instead of numpy's global RNG: exact after a restart
    with persistent workers."""
    from timm.data import create_transform

    mean, std = dataset_stats(data_set)
    transform = create_transform(
        input_size=input_size,
        is_training=True,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        mean=mean,
        std=std,
        hflip=0.0 if data_set == "digits" else 0.5,
        scale=(0.6, 1.0) if data_set == "digits" else (0.08, 1.0),
    )
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


