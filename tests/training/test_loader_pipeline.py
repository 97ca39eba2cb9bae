"""The uint8 loader pipeline: same draws and pixels as the float pipeline it replaced, normalisation on
the device, DataLoader workers, pre-training on JPEGs with exact resume, the --num_workers default.

The fixed image set: scikit-learn's two bundled photographs (china.jpg, flower.jpg; no download), cut
into 500x375 JPEGs (ImageNet's common size: full-resolution decode, whole-pixel boxes) and 1200x900
ones (large crops there are decoded at 1/2 or 1/4 size by JPEG DCT scaling).
"""
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision
from torchvision import transforms

import main_finetune
import main_pretrain_d3p
from conftest import load_ckpt
import util.image_io as image_io
import util.image_transforms as image_transforms
from util.data_errors import CorruptImageError
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, DigitsDataset, IndexedDataset, build_dataset, dataset_stats
from util.image_io import EncodedJpeg, _decode_reduced, decode_pixels, lazy_loader
from util.image_transforms import (
    RandomResizedCropUint8, ResizeCenterCropUint8, eval_transform, pretrain_transform, random_resized_crop_box,
)
from util.loader import collate_indexed, default_num_workers
from util.device_input import DeviceNormalize

SIZE = 224
BICUBIC = transforms.InterpolationMode.BICUBIC
CUTS = [((0, 0, 569, 427), (500, 375)), ((71, 0, 640, 427), (500, 375)), ((100, 50, 500, 350), (500, 375)),
        ((0, 0, 569, 427), (1200, 900))]


def _photo_folder(root: str) -> str:
    from sklearn.datasets import load_sample_images

    folder = os.path.join(root, "train", "photo")
    os.makedirs(folder)
    for p, pixels in enumerate(load_sample_images().images):
        img = Image.fromarray(pixels)
        for k, (box, size) in enumerate(CUTS):
            img.resize(size, Image.BICUBIC, box=box).save(os.path.join(folder, f"{p}_{k}.jpg"), quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _photo_folder(str(tmp_path_factory.mktemp("photos")))


def _old_pretrain(size: int = SIZE):
    """The float pipeline the uint8 one replaced, minus ToTensor/Normalize (compared in uint8 here)."""
    return transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=BICUBIC),
                               transforms.RandomHorizontalFlip(), transforms.PILToTensor()])


@pytest.fixture(scope="module", params=["fancy", "fast"])
def pretrain_pairs(photos, request):
    """For every image and seeds 0-9, with --jpeg_upsampling fancy and fast: (upsampling, new uint8,
    old uint8, RNG states after each, is 1200x900)."""
    new = build_dataset("train", "folder", photos, pretrain_transform("folder", SIZE, request.param))
    old = build_dataset("train", "folder", photos, _old_pretrain())
    assert new.transform.fast_upsampling == (request.param == "fast")
    rows = []
    for i, (path, _) in enumerate(new.samples):
        for seed in range(10):
            torch.manual_seed(seed)
            a = new[i][0]
            state_a = torch.get_rng_state()
            torch.manual_seed(seed)
            b = old[i][0]
            rows.append((request.param, a, b, state_a, torch.get_rng_state(), path.endswith("_3.jpg")))
    return rows


def test_same_seed_gives_the_same_box_and_flip_and_nearly_the_same_pixels(pretrain_pairs):
    for upsampling, a, b, state_a, state_b, large in pretrain_pairs:
        # channels-last memory ([H, W, 3]): what the resize kernel computes, transposed on the device
        assert a.dtype == torch.uint8 and a.shape == (3, SIZE, SIZE) and a.permute(1, 2, 0).is_contiguous()
        # the same draws from the same RNG: seeding, workers and resume behave as before
        assert torch.equal(state_a, state_b)
        diff = (a.float() - b.float()).abs().mean().item()
        # fancy, whole-pixel boxes (500x375): PIL's decode and PIL's bicubic filter computed by torch's
        # uint8 kernel, so only rounding differs (measured <= 0.005 levels on average). A box shifted
        # or flipped the other way would differ by tens of levels. fast: libjpeg's merged chroma
        # upsampler moves pixels at colour edges (measured <= 1.85 levels on average on these two
        # photos, strong colour edges; channel means unmoved: next test). DCT-scaled decode (1200x900):
        # libjpeg's 1/2 or 1/4 scaling does part of the low-pass that bicubic antialiasing did, with
        # either upsampling (measured <= 1.2 levels on average).
        bound = 0.5 if upsampling == "fancy" and not large else 3.0
        assert diff < bound, (upsampling, diff)


def test_channel_means_and_stds_match_the_float_pipeline(pretrain_pairs):
    new = torch.stack([r[1] for r in pretrain_pairs]).float().transpose(0, 1).reshape(3, -1)
    old = torch.stack([r[2] for r in pretrain_pairs]).float().transpose(0, 1).reshape(3, -1)
    # 80 crops of 224x224: per-channel statistics agree to 0.01 (mean) and 0.03 (std) levels as measured,
    # with either chroma upsampling; 0.25 levels (0.1% of a std of ~80 levels) leaves room for other
    # libjpeg/CPU builds, while a blurrier resize, a colour-space slip, libjpeg's fast IDCT (1.5 levels
    # of mean shift, measured) or a wrong crop scale moves them by whole levels
    assert torch.allclose(new.mean(1), old.mean(1), atol=0.25)
    assert torch.allclose(new.std(1), old.std(1), atol=0.25)


def test_fast_upsampling_changes_chroma_only(photos):
    """--jpeg_upsampling fast is libjpeg's merged upsampler: the chroma planes are interpolated another
    way, the luma plane and the IDCT are the accurate ones. Compared in YCbCr with PIL's decode."""
    folder = os.path.join(photos, "train", "photo")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        reference = np.asarray(Image.open(path).convert("RGB").convert("YCbCr"), dtype=np.int16)
        fancy, k_fancy = decode_pixels(lazy_loader(path), 1.0, fast_upsampling=False)
        fast, k_fast = decode_pixels(lazy_loader(path), 1.0, fast_upsampling=True)
        assert k_fancy == k_fast == 1 and fast.shape == fancy.shape == (*reference.shape[:2], 3)
        assert np.array_equal(np.asarray(Image.fromarray(fancy).convert("YCbCr"), dtype=np.int16), reference)
        diff = np.abs(np.asarray(Image.fromarray(fast).convert("YCbCr"), dtype=np.int16) - reference)
        luma, chroma = diff[..., 0].mean(), diff[..., 1:].mean()
        # measured: luma 0.16-0.30 levels (the RGB round trip's rounding), chroma 0.34-0.87 levels
        # (max 24 at sharp colour edges). libjpeg's fast IDCT instead moves luma by 0.6-0.7 levels
        assert 0 < luma < 0.4 and luma < chroma < 1.5 and diff[..., 1:].max() <= 40, (name, luma, chroma)


def test_jpeg_upsampling_flag_reaches_the_training_crops_only(photos):
    assert pretrain_transform("folder", SIZE).fast_upsampling  # the default: argument absent (library use) or "fast"
    assert main_pretrain_d3p.get_args_parser().parse_args([]).jpeg_upsampling == "fast"
    assert main_finetune.get_args_parser().parse_args([]).jpeg_upsampling == "fast"
    assert not pretrain_transform("folder", SIZE, "fancy").fast_upsampling
    args = SimpleNamespace(data_set="folder", data_path=photos, input_size=SIZE, jpeg_upsampling="fancy")
    assert not main_finetune.linprobe_transform(True, args).fast_upsampling
    with pytest.raises(ValueError, match="--jpeg_upsampling 'fastest'.*fast, fancy"):
        pretrain_transform("folder", SIZE, "fastest")
    with pytest.raises(SystemExit):
        main_pretrain_d3p.get_args_parser().parse_args(["--jpeg_upsampling", "fastest"])
    # evaluation and the embeddings pass decode as PIL does, whatever the flag
    spy = _SpyJpeg()
    eval_tf = eval_transform("folder", SIZE)
    original = image_io.simplejpeg
    try:
        image_io.simplejpeg = spy
        eval_tf(lazy_loader(os.path.join(photos, "train", "photo", "0_0.jpg")))
    finally:
        image_io.simplejpeg = original
    assert spy.kwargs and not any(kw.get("fastupsample") for kw in spy.kwargs)


def _recover_box(out: torch.Tensor) -> tuple[float, float, bool]:
    """A crop of the coordinate image (R = x, G = y) -> (area, aspect w/h, flipped), read from two interior
    rows/columns, where bicubic reproduces a linear ramp exactly up to rounding."""
    size = out.shape[-1]
    c1, c2 = size // 4, 3 * size // 4
    r = out[0].double()
    g = out[1].double()
    dx = (r[size // 2, c2] - r[size // 2, c1]).item() * size / (c2 - c1)  # negative when flipped
    dy = (g[c2, size // 2] - g[c1, size // 2]).item() * size / (c2 - c1)
    return abs(dx) * dy, abs(dx) / dy, dx < 0


def test_crop_scale_and_aspect_histograms_match(tmp_path):
    w, h = 240, 180
    ramp = np.zeros((h, w, 3), np.uint8)
    ramp[..., 0] = np.arange(w)[None, :]
    ramp[..., 1] = np.arange(h)[:, None]
    os.makedirs(tmp_path / "train" / "c")
    Image.fromarray(ramp).save(tmp_path / "train" / "c" / "ramp.png")  # lossless: exact coordinates
    new = build_dataset("train", "folder", str(tmp_path), pretrain_transform("folder", 32))
    old = build_dataset("train", "folder", str(tmp_path), _old_pretrain(32))
    got = {"new": [], "old": []}
    for seed in range(300):
        for name, ds in (("new", new), ("old", old)):
            torch.manual_seed(seed)
            got[name].append(_recover_box(ds[0][0]))
    for name in got:
        got[name] = np.array(got[name], dtype=float)
    area_new, area_old = got["new"][:, 0] / (w * h), got["old"][:, 0] / (w * h)
    aspect_new, aspect_old = got["new"][:, 1], got["old"][:, 1]
    assert np.array_equal(got["new"][:, 2], got["old"][:, 2])  # the same flips
    assert 0.4 < got["new"][:, 2].mean() < 0.6
    # RandomResizedCrop's law: area fraction in [0.2, 1], aspect in [3/4, 4/3] (up to the read-out's rounding)
    assert area_new.min() > 0.17 and area_new.max() < 1.05
    assert aspect_new.min() > 0.7 and aspect_new.max() < 1.4
    area_bins, aspect_bins = np.linspace(0.15, 1.05, 7), np.exp(np.linspace(np.log(0.7), np.log(1.4), 7))
    for new_v, old_v, bins in ((area_new, area_old, area_bins), (aspect_new, aspect_old, aspect_bins)):
        h_new, h_old = np.histogram(new_v, bins)[0], np.histogram(old_v, bins)[0]
        assert h_new.sum() == h_old.sum() == 300
        # the same boxes: counts can only move across a bin edge by the read-out's rounding
        assert np.abs(h_new - h_old).max() <= 6, (h_new, h_old)
    assert np.abs(area_new - area_old).max() < 0.05 and np.abs(aspect_new - aspect_old).max() < 0.06


def test_box_rule_equals_torchvision_get_params_for_1000_seeds():
    """random_resized_crop_box == RandomResizedCrop.get_params: the same box and the same RNG state after,
    for every seed, on common, tiny and extreme-aspect images (the last two reach the central-crop fallback)."""
    transform = RandomResizedCropUint8(224, scale=(0.2, 1.0))
    sizes = [(375, 500), (500, 375), (224, 224), (3, 2), (1, 1), (1, 7), (10, 400), (400, 10)]
    fallbacks = 0
    for height, width in sizes:
        image = Image.new("RGB", (width, height))
        for seed in range(1000):
            torch.manual_seed(seed)
            expected = transforms.RandomResizedCrop.get_params(image, transform.scale, transform.ratio)
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            got = random_resized_crop_box(height, width, transform.scale, transform.log_ratio, transform.ratio)
            assert got == expected, (height, width, seed)
            assert torch.equal(torch.get_rng_state(), state), (height, width, seed)
            top, left, h, w = got
            fallbacks += (top, left) == ((height - h) // 2, (width - w) // 2) and (h == height or w == width)
    assert fallbacks > 2000  # the 1x7, 10x400 and 400x10 images take the fallback for almost every seed


def test_lazy_loader_reads_jpegs_once_and_leaves_the_rest_to_pil(photos, tmp_path):
    path = os.path.join(photos, "train", "photo", "0_3.jpg")
    encoded = lazy_loader(path)
    assert isinstance(encoded, EncodedJpeg) and encoded.size == Image.open(path).size == (1200, 900)
    for max_reduction in (1.0, 2.0, 4.0, 8.0):
        pixels, k = decode_pixels(encoded, max_reduction)
        reference, k_pil = _decode_reduced(Image.open(path), max_reduction)
        assert k == k_pil and np.array_equal(pixels, np.array(reference))  # accurate IDCT: bit-identical
    Image.open(path).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)  # simplejpeg: header only
    Image.open(path).save(tmp_path / "photo.png")
    for name in ("cmyk.jpg", "photo.png"):
        img = lazy_loader(str(tmp_path / name))
        assert isinstance(img, Image.Image) and img.size == (1200, 900)


def test_dct_scaled_decode_only_where_the_crop_keeps_full_resolution(photos):
    path = os.path.join(photos, "train", "photo", "0_3.jpg")  # 1200x900
    cases = ((1.9, 1, (1200, 900)), (2.0, 2, (600, 450)), (7.9, 4, (300, 225)), (8, 8, (150, 113)))
    for max_reduction, k, size in cases:
        img, factor = _decode_reduced(Image.open(path), max_reduction)
        assert (factor, img.size, img.mode) == (k, size, "RGB")
    loaded = Image.open(path).convert("RGB")  # already decoded: nothing to reduce
    assert _decode_reduced(loaded, 8)[1] == 1
    grey = os.path.join(photos, "grey.jpg")  # outside train/: not part of the fixed set
    loaded.convert("L").save(grey, quality=90)
    img, factor = _decode_reduced(Image.open(grey), 2.0)
    assert (factor, img.size, img.mode) == (2, (600, 450), "RGB")


class _SpyJpeg:
    """Stands in for the simplejpeg module: records the files' sizes it is asked to decode, and decodes
    them with the real simplejpeg, or raises as simplejpeg does on data it rejects (headers are parsed
    by the real one)."""

    def __init__(self, fail: bool = False):
        import simplejpeg

        self.real, self.fail, self.calls, self.kwargs = simplejpeg, fail, [], []

    def decode_jpeg(self, data, **kwargs):
        self.calls.append(len(data))
        self.kwargs.append(kwargs)
        if self.fail:
            raise ValueError("simulated simplejpeg failure")
        return self.real.decode_jpeg(data, **kwargs)

    def decode_jpeg_header(self, data):  # lazy_loader's size and colour space: the real parser
        return self.real.decode_jpeg_header(data)


def test_simplejpeg_decode_agrees_with_pil(photos, monkeypatch):
    spy = _SpyJpeg()
    monkeypatch.setattr(image_io, "simplejpeg", spy)
    grey = os.path.join(photos, "grey_small.jpg")  # outside train/: not part of the fixed set
    Image.open(os.path.join(photos, "train", "photo", "0_0.jpg")).convert("L").save(grey, quality=90)
    folder = os.path.join(photos, "train", "photo")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    for path in paths + [grey]:
        for max_reduction in (1.0, 2.0, 4.0, 8.0):
            pixels, k = decode_pixels(Image.open(path), max_reduction)
            reference, k_pil = _decode_reduced(Image.open(path), max_reduction)
            reference = np.array(reference)
            assert (pixels.dtype, pixels.shape, k) == (np.uint8, reference.shape, k_pil), (path, max_reduction)
            # both libjpeg-turbo with the accurate IDCT: measured identical; 0.5 levels would still be a
            # rounding difference, a colour-space or upsampling slip costs whole levels
            assert np.abs(pixels.astype(np.int16) - reference).mean() < 0.5, (path, max_reduction)
    assert len(spy.calls) == 4 * (len(paths) + 1)  # every one of them went through simplejpeg


def test_pil_decodes_what_simplejpeg_rejects(photos, tmp_path, monkeypatch):
    # PIL's fallback decode has no fast upsampling: compared bit for bit with "fancy"
    dataset = build_dataset("train", "folder", photos, pretrain_transform("folder", SIZE, "fancy"))
    torch.manual_seed(5)
    expected = [dataset[i][0] for i in range(len(dataset))]
    spy = _SpyJpeg(fail=True)
    monkeypatch.setattr(image_io, "simplejpeg", spy)
    torch.manual_seed(5)
    for i in range(len(dataset)):
        assert torch.equal(dataset[i][0], expected[i])  # PIL's decode: the same pixels, the same draws
    assert len(spy.calls) == len(dataset)

    # a PNG among the JPEGs is PIL's from the start; a truncated JPEG still names the file
    root = _photo_folder(str(tmp_path))
    Image.open(os.path.join(root, "train", "photo", "1_0.jpg")).save(os.path.join(root, "train", "photo", "png.png"))
    bad = os.path.join(root, "train", "photo", "0_1.jpg")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    spy = _SpyJpeg()
    monkeypatch.setattr(image_io, "simplejpeg", spy)
    dataset = build_dataset("train", "folder", root, pretrain_transform("folder", SIZE))
    files = [p for p, _ in dataset.samples]
    out = dataset[files.index(os.path.join(root, "train", "photo", "png.png"))][0]
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.uint8 and spy.calls == []
    with pytest.raises(CorruptImageError, match="0_1.jpg.*--skip_corrupt"):
        dataset[files.index(bad)]
    assert spy.calls == [os.path.getsize(bad)]  # simplejpeg rejected it first, then PIL named the file


def test_eval_transform_is_uint8_and_matches_resize_center_crop(photos):
    new = build_dataset("train", "folder", photos, eval_transform("folder", SIZE))
    assert isinstance(new.transform, ResizeCenterCropUint8)
    old = build_dataset("train", "folder", photos, transforms.Compose([
        transforms.Resize(int(SIZE / 0.875), interpolation=BICUBIC), transforms.CenterCrop(SIZE),
        transforms.PILToTensor()]))
    for i, (path, _) in enumerate(new.samples):
        a, b = new[i][0], old[i][0]
        assert a.dtype == torch.uint8 and a.shape == (3, SIZE, SIZE)
        diff = (a.float() - b.float()).abs().mean().item()
        assert diff < (3.0 if path.endswith("_3.jpg") else 0.5), (path, diff)


def test_channels_last_images_equal_the_kernels_own_layout_and_collate_without_transposing(photos):
    """The uint8 transforms write the resize kernel's channels-last result as is; values equal the
    kernel's default (contiguous) output bit for bit, and collation, pinning and DeviceNormalize give
    the batch the contiguous float pipeline gave."""
    pixels = np.array(Image.open(os.path.join(photos, "train", "photo", "0_0.jpg")).convert("RGB"))
    cases = ((10, 20, 300, 250, (224, 224)), (0, 0, 375, 500, (32, 32)), (5, 7, 224, 224, (224, 224)),
             (0, 0, 100, 90, (224, 224)), (3, 4, 1, 9, (7, 1)), (3, 4, 9, 1, (1, 7)))
    for top, left, height, width, size in cases:  # down, up, no resize; one-pixel boxes and outputs
        out = image_transforms._resize_crop(pixels, top, left, height, width, size)
        crop = torch.from_numpy(np.ascontiguousarray(pixels[top:top + height, left:left + width])).permute(2, 0, 1)
        reference = F.interpolate(crop[None].contiguous(), size=size, mode="bicubic", antialias=True)[0]
        assert out.shape == (3, *size) and out.permute(1, 2, 0).is_contiguous()
        assert torch.equal(out, reference), (top, left, height, width, size)

    eval_set = build_dataset("train", "folder", photos, eval_transform("folder", 32))
    samples = [(t.flip(-1) if i % 2 else t, i, i) for i, t in enumerate(eval_set[j][0] for j in range(5))]
    assert all(t.permute(1, 2, 0).is_contiguous() for t, _, _ in samples)  # flip keeps the layout
    imgs, targets, index = collate_indexed(samples)
    assert imgs.shape == (5, 3, 32, 32) and imgs.permute(0, 2, 3, 1).is_contiguous()
    assert torch.equal(imgs, torch.stack([t.contiguous() for t, _, _ in samples]))
    assert targets.tolist() == index.tolist() == list(range(5))
    contiguous = [(t.contiguous(), i, i) for t, i, _ in samples]  # digits/CIFAR: PILToTensor's layout
    assert collate_indexed(contiguous)[0].is_contiguous()
    assert torch.equal(collate_indexed(contiguous)[0], imgs)
    normalise = DeviceNormalize((IMAGENET_MEAN, IMAGENET_STD), "cpu")
    got, expected = normalise(imgs), normalise(imgs.contiguous())
    assert got.is_contiguous() and torch.equal(got, expected)


def test_device_normalisation_equals_the_cpu_normalisation(photos):
    """ToTensor + Normalize on the CPU (the former pipeline) == uint8 batch + DeviceNormalize, bit for bit."""
    img = Image.open(os.path.join(photos, "train", "photo", "1_0.jpg")).convert("RGB")
    cpu = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(img))
    dev = DeviceNormalize((IMAGENET_MEAN, IMAGENET_STD), "cpu")(transforms.PILToTensor()(img).unsqueeze(0))
    assert dev.dtype == torch.float32 and torch.equal(dev[0], cpu)

    # digits: the whole old pre-training transform against the new one + collation + DeviceNormalize
    mean, std = dataset_stats("digits")
    old_tf = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.6, 1.0), interpolation=BICUBIC),
                                 transforms.ToTensor(), transforms.Normalize(mean, std)])
    old_ds, new_ds = DigitsDataset(True, old_tf), IndexedDataset(DigitsDataset(True, pretrain_transform("digits", 16)))
    torch.manual_seed(3)
    expected = torch.stack([old_ds[i][0] for i in range(8)])
    torch.manual_seed(3)
    batch, _, index = collate_indexed([new_ds[i] for i in range(8)])
    assert batch.dtype == torch.uint8 and index.tolist() == list(range(8))
    assert torch.equal(DeviceNormalize((mean, std), "cpu")(batch), expected)

    already = torch.randn(2, 3, 4, 4)  # timm's fine-tuning transform normalises on the CPU: only moved
    assert DeviceNormalize((mean, std), "cpu")(already) is already
    with pytest.raises(ValueError, match="input_stats"):
        DeviceNormalize(None, "cpu")(batch)


def _collate_and_report_shared(batch):
    imgs = collate_indexed(batch)[0]
    return imgs, imgs.is_shared()


def test_workers_deliver_uint8_batches_and_name_corrupt_jpegs(photos, tmp_path):
    dataset = IndexedDataset(build_dataset("train", "folder", photos, pretrain_transform("folder", 32)))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_indexed,
                        generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 32, 32)] * 2
    assert all(b[0].dtype == torch.uint8 and b[2].dtype == torch.int64 for b in batches)
    # channels-last across the worker queue, stacked straight into shared memory in the worker
    assert all(b[0].permute(0, 2, 3, 1).is_contiguous() for b in batches)
    in_worker = DataLoader(dataset, batch_size=4, num_workers=1, generator=torch.Generator().manual_seed(0),
                           collate_fn=_collate_and_report_shared)
    assert [shared for _, shared in in_worker] == [True, True]
    assert not collate_indexed([dataset[0], dataset[1]])[0].is_shared()  # the main process: plain memory

    root = _photo_folder(str(tmp_path))
    bad = os.path.join(root, "train", "photo", "0_1.jpg")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)  # the header parses; decoding fails
    dataset = build_dataset("train", "folder", root, pretrain_transform("folder", SIZE))
    index = [p for p, _ in dataset.samples].index(bad)
    with pytest.raises(CorruptImageError, match="0_1.jpg.*--skip_corrupt"):
        dataset[index]
    assert IndexedDataset(dataset, skip_corrupt=True)[index][2] == -1 - index


def test_pretraining_on_jpegs_resumes_exactly(photos, tmp_path):
    # input 32: crops of >= 64/128/256 px decode at 1/2, 1/4, 1/8 size, so every path runs. In-process
    # loading (workers: test above): persistent DataLoader workers keep their RNG streams across epochs,
    # which no resume reproduces, with the float pipeline as with this one
    common = ["--data_set", "folder", "--data_path", photos, "--input_size", "32", "--model", "mae_vit_tiny_patch4",
              "--num_workers", "0", "--batch_size", "4", "--epochs", "2", "--save_every", "1",
              "--prune_method", "none", "--warmup_epochs", "1", "--blr", "1e-3"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert main_pretrain_d3p.cli([*common, "--output_dir", straight]) == 0
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "checkpoint-0.pth"), resumed)
    assert main_pretrain_d3p.cli([*common, "--output_dir", resumed, "--auto_resume"]) == 0
    a, b = load_ckpt(straight, 1)["model"], load_ckpt(resumed, 1)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_num_workers_default_shares_this_process_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers({}) == 16  # capped
    assert default_num_workers({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert default_num_workers({"LOCAL_WORLD_SIZE": "128"}) == 1  # never 0
    assert default_num_workers({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
    assert default_num_workers({"SLURM_CPUS_PER_TASK": "6", "SLURM_NTASKS_PER_NODE": "4"}) == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert default_num_workers({"LOCAL_WORLD_SIZE": "4"}) == 1
    # both entry scripts resolve the flag's default after parsing, from this environment
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    args = main_pretrain_d3p.get_args_parser().parse_args([])
    main_pretrain_d3p.fill_defaults(args)
    assert args.num_workers == 3
    args = main_finetune.get_args_parser().parse_args(["--model", "vit_tiny_patch4"])
    main_finetune.resolve_defaults(args)
    assert args.num_workers == 3
    args = main_pretrain_d3p.get_args_parser().parse_args(["--num_workers", "0"])
    main_pretrain_d3p.fill_defaults(args)
    assert args.num_workers == 0


def _coordinate_image(width: int = 32, height: int = 32) -> Image.Image:
    """R = 8 x, G = 8 y (x, y < 32): any crop's R grows left to right unless it was flipped."""
    ramp = np.zeros((height, width, 3), np.uint8)
    ramp[..., 0] = (np.arange(width) * (256 // width))[None, :]
    ramp[..., 1] = (np.arange(height) * (256 // height))[:, None]
    return Image.fromarray(ramp)


def _flipped(out: torch.Tensor) -> bool:
    """A crop [3, S, S] of the coordinate image (uint8, or float normalised per channel) -> flipped?"""
    size = out.shape[-1]
    r = out[0].double()
    return bool(r[size // 2, 3 * size // 4] < r[size // 2, size // 4])


@pytest.mark.parametrize("data_set, expected", [("cifar10", 0.5), ("cifar100", 0.5), ("digits", 0.0),
                                                 ("folder", 0.5)])
def test_every_pretraining_pipeline_flips_half_the_crops(data_set, expected):
    """MAE's pre-training augmentation flips each crop with probability 1/2 (the in-memory CIFAR pipeline and
    the uint8 JPEG one alike); digits are never flipped (a mirrored digit is another shape). 400 crops of the
    coordinate image under a fixed seed: the flip rate of a correct pipeline lies within 0.5 +- 0.1 (4 sd)."""
    transform = pretrain_transform(data_set, 16)
    image = _coordinate_image()
    torch.manual_seed(0)
    flips = [_flipped(transform(image)) for _ in range(400)]
    rate = float(np.mean(flips))
    if expected == 0.0:
        assert rate == 0.0
    else:
        assert abs(rate - expected) < 0.1, rate
