"""Opening and decoding image files: PIL, or simplejpeg (libjpeg-turbo) for JPEGs when it is installed.

Every failure raises CorruptImageError naming the file. Two ways to open a file:
  checked_loader  decodes at once to an RGB PIL image (the transforms of torchvision and timm take it);
  lazy_loader     reads the header only (a JPEG: its bytes, as an EncodedJpeg), so that decode_pixels can
                  decode it later at the reduced size a crop allows (util.image_transforms).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from util.data_errors import CorruptImageError

try:  # libjpeg-turbo straight into a numpy array: ~1/3 less CPU per JPEG than PIL's decode + convert
    import simplejpeg
except ImportError:  # optional: PIL decodes everything without it
    simplejpeg = None

JPEG_DCT_SCALES = (8, 4, 2)  # libjpeg decodes at 1/8, 1/4, 1/2 size natively (PIL's draft mode)

_DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def _corrupt_image_error(path: str, exc: Exception) -> CorruptImageError:
    return CorruptImageError(
        f"cannot read image {path}: {exc}. Fix: remove or replace the file, or pass --skip_corrupt "
        "to replace unreadable images by their neighbour and count them in log.txt"
    )


def checked_loader(path: str) -> Image.Image:
    """PIL loader that names the file when an image cannot be decoded."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            return img.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise _corrupt_image_error(path, exc) from exc


class EncodedJpeg:
    """A JPEG file's bytes and header, not yet decoded: what `lazy_loader` gives the uint8 transforms
    for a colour or greyscale JPEG when simplejpeg is installed. `size` is (width, height), as PIL's."""

    __slots__ = ("path", "data", "size")

    def __init__(self, path: str, data: bytes, size: tuple[int, int]):
        self.path, self.data, self.size = path, data, size


_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")  # decoded to RGB by simplejpeg; CMYK/YCCK go to PIL


def lazy_loader(path: str) -> Image.Image | EncodedJpeg:
    """Open an image without decoding it: the uint8 transforms below decode it, at reduced size where
    their crop allows (util.image_transforms), and name the file if decoding fails.

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


def decode_pixels(img: Image.Image | EncodedJpeg, max_reduction: float,
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
    levels on average and no shift of the channel means (tests/training/test_loader_pipeline.py). PIL has no such
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

