"""Loader throughput per CPU core on real JPEGs: the former float32 pipeline, the uint8 one, decode alone.

    python benchmarks/bench_loader.py [--input_size 224] [--rounds 7] [--passes 4]

Builds an ImageFolder of 500x375 JPEGs (quality 90) from the colour photographs that ship inside
scikit-image (astronaut, chelsea, coffee, rocket, ...: 4 crops each), then times, in this one process
with one thread per library (what one DataLoader worker does), `dataset[i]` over all images, in CPU
time of this process (images/s per core; robust to other processes on the machine, wall time also shown):

  old     the former pre-training pipeline: full decode + convert('RGB'), torchvision
          RandomResizedCrop(bicubic) + flip on the PIL image, ToTensor, Normalize (float32 out)
  new     util.image_transforms.pretrain_transform with its defaults (--jpeg_upsampling fast): lazy open (a JPEG: bytes
          + header), box drawn by the same rule, decode with simplejpeg (PIL without it; at 1/2..1/8 size
          where the box allows; libjpeg's merged chroma upsampler), crop view, torch's uint8 bicubic
          resize into channels-last memory, flip (uint8 out)
  new fancy   the same with --jpeg_upsampling fancy: pixels decoded as PIL decodes them
  decode  open + decode + convert('RGB') with PIL: the former loader alone, "decode alone" as the
          issue measured it; and simplejpeg.decode_jpeg of the file's bytes (read included): the
          decoder the new pipeline uses, its own floor
  eval    the centre-crop transforms (D3P's embeddings pass, linear-probe / fine-tune eval), old and new

Pipelines are interleaved within each round; the median round is printed. Needs scikit-image
(requirements.txt). Numbers are per core: a loader with W workers feeds about W times as many.

--workers W (default 0: skipped) also runs whole DataLoaders, W workers, batch 64, over the images
repeated: the previous transform with the previous collation (torch.stack) against the new transform
with collate_indexed (channels-last stacking straight into shared memory), in wall images/s of the
main process. Keep W below the machine's cores: the main process receives the batches.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

# one thread per library, as in a DataLoader worker (torch sets 1 there; OpenMP/BLAS pools would
# otherwise start with the machine's core count): set before numpy and torch load
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

try:
    import simplejpeg  # noqa: E402
except ImportError:
    simplejpeg = None
from torchvision import transforms  # noqa: E402

from torch.utils.data import DataLoader  # noqa: E402

from util.datasets import IMAGENET_MEAN, IMAGENET_STD, IndexedDataset, build_dataset  # noqa: E402
from util.image_io import checked_loader  # noqa: E402
from util.image_transforms import eval_transform, pretrain_transform  # noqa: E402
from util.loader import collate_indexed  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
JPEG_SIZE = (500, 375)  # ImageNet's most common size


def photos() -> list[np.ndarray]:
    """The colour photographs bundled with scikit-image (no download), uint8 [H, W, 3]."""
    try:
        from skimage import data
    except ImportError as exc:
        raise SystemExit("bench_loader needs scikit-image for its sample photos: pip install scikit-image") from exc
    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            out += [img[0], img[1]]
        else:
            out.append(img)
    return out


def build_folder(root: str, crops_per_photo: int = 4) -> int:
    """root/train/<photo>/<k>.jpg: 4:3 crops of each photo at several positions and zooms, resized to
    500x375, JPEG quality 90. Returns the number of files."""
    count = 0
    for p, pixels in enumerate(photos()):
        img = Image.fromarray(pixels).convert("RGB")
        w, h = img.size
        full = min(w / 4, h / 3)  # the largest 4:3 box
        folder = os.path.join(root, "train", f"photo{p}")
        os.makedirs(folder)
        for k in range(crops_per_photo):
            zoom = 1.0 - 0.15 * k  # 100%, 85%, 70%, 55% of the largest box
            bw, bh = 4 * full * zoom, 3 * full * zoom
            left, top = (w - bw) * (k % 2), (h - bh) * (k // 2 % 2)  # corners in turn
            box = tuple(round(v) for v in (left, top, left + bw, top + bh))
            img.resize(JPEG_SIZE, Image.BICUBIC, box=box).save(os.path.join(folder, f"{k}.jpg"), quality=90)
            count += 1
    return count


def old_pretrain_transform(size: int):
    """The float32 pipeline this project used before the uint8 one (MAE's main_pretrain.py)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def old_eval_transform(size: int):
    return transforms.Compose([
        transforms.Resize(int(size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def decode_simplejpeg(path: str) -> np.ndarray:
    """uint8 [H, W, 3]: read the file and decode it with libjpeg-turbo's accurate IDCT, full size."""
    with open(path, "rb") as f:
        return simplejpeg.decode_jpeg(f.read(), colorspace="RGB")


def collate_stack(batch):
    """The previous collation: torch.stack of the images, targets and indices as int64."""
    return (torch.stack([b[0] for b in batch]), torch.as_tensor([b[1] for b in batch]),
            torch.as_tensor([b[2] for b in batch]))


def dataloader_images_per_second(dataset, collate, workers: int, samples: int, batch_size: int = 64) -> float:
    """Wall images/s that a DataLoader with `workers` workers delivers to this process, after the first
    batch (worker start-up excluded)."""
    indices = [i % len(dataset) for i in range(samples + batch_size)]
    loader = DataLoader(IndexedDataset(dataset), batch_size=batch_size, sampler=indices, num_workers=workers,
                        collate_fn=collate, prefetch_factor=4)
    batches = iter(loader)
    next(batches)
    start, count = time.perf_counter(), 0
    for imgs, _, _ in batches:
        count += imgs.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds; the median is printed")
    p.add_argument("--passes", type=int, default=4, help="passes over the images per pipeline and round")
    p.add_argument("--workers", type=int, default=0,
                   help="also time whole DataLoaders with this many workers (0: skip)")
    args = p.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker = one core

    with tempfile.TemporaryDirectory() as root:
        n = build_folder(root)
        size = args.input_size
        old = build_dataset("train", "folder", root, old_pretrain_transform(size))
        new = build_dataset("train", "folder", root, pretrain_transform("folder", size))
        new_fancy = build_dataset("train", "folder", root, pretrain_transform("folder", size, "fancy"))
        old_eval = build_dataset("train", "folder", root, old_eval_transform(size))
        new_eval = build_dataset("train", "folder", root, eval_transform("folder", size))
        paths = [path for path, _ in old.samples]
        pipelines = {
            "old (float32)": lambda i: old[i][0],
            "new (uint8)": lambda i: new[i][0],
            "new fancy (uint8)": lambda i: new_fancy[i][0],
            "decode PIL (floor)": lambda i: checked_loader(paths[i]),
            "decode simplejpeg": lambda i: decode_simplejpeg(paths[i]),
            "eval old (float32)": lambda i: old_eval[i][0],
            "eval new (uint8)": lambda i: new_eval[i][0],
        }
        if simplejpeg is None:
            print("simplejpeg is not installed: the new pipeline decodes with PIL (pip install simplejpeg)")
            del pipelines["decode simplejpeg"]
        torch.manual_seed(0)
        for fn in pipelines.values():  # warm-up: file cache, allocator, kernels
            for i in range(n):
                fn(i)
        seconds = {name: [] for name in pipelines}  # CPU seconds of this process per image
        wall = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, fn in pipelines.items():
                start, start_wall = time.process_time(), time.perf_counter()
                for _ in range(args.passes):
                    for i in range(n):
                        fn(i)
                seconds[name].append((time.process_time() - start) / (args.passes * n))
                wall[name].append((time.perf_counter() - start_wall) / (args.passes * n))
        loader_rates = {"old": [], "new": []}
        if args.workers > 0:
            for _ in range(3):
                loader_rates["old"].append(dataloader_images_per_second(old, collate_stack, args.workers, 40 * n))
                loader_rates["new"].append(dataloader_images_per_second(new, collate_indexed, args.workers, 40 * n))
        bytes_old, bytes_new = old[0][0], new[0][0]
        bytes_old = bytes_old.numel() * bytes_old.element_size()
        bytes_new = bytes_new.numel() * bytes_new.element_size()

    per_image = {name: statistics.median(v) for name, v in seconds.items()}
    per_image_wall = {name: statistics.median(v) for name, v in wall.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{n} JPEGs {JPEG_SIZE[0]}x{JPEG_SIZE[1]} q90 (scikit-image photos), output {args.input_size}px, "
          f"1 torch thread, median of {args.rounds} rounds x {args.passes} passes, load average {load:.2f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{'pipeline':>26} {'CPU ms/image':>13} {'images/s/core':>14} {'wall ms/image':>14}")
    for name, sec in per_image.items():
        print(f"{name:>26} {sec * 1e3:>13.3f} {1 / sec:>14.0f} {per_image_wall[name] * 1e3:>14.3f}")
    old_s, new_s, floor_s = per_image["old (float32)"], per_image["new (uint8)"], per_image["decode PIL (floor)"]
    print(f"speed-up new vs old: {old_s / new_s:.2f}x (target >= 2.5x); with --jpeg_upsampling fancy: "
          f"{old_s / per_image['new fancy (uint8)']:.2f}x")
    print(f"new vs decode alone with PIL (the former decoder, the issue's floor): {new_s / floor_s:.2f}x its time "
          f"(target <= 1.5x)")
    if "decode simplejpeg" in per_image:
        print(f"new vs decode alone with simplejpeg (the new pipeline's own decoder): "
              f"{new_s / per_image['decode simplejpeg']:.2f}x its time")
    print(f"eval speed-up new vs old: {per_image['eval old (float32)'] / per_image['eval new (uint8)']:.2f}x")
    print(f"bytes per sample to the device: old {bytes_old:,} (float32), new {bytes_new:,} (uint8), "
          f"{bytes_old / bytes_new:.0f}x less")
    if args.workers > 0:
        rate_old, rate_new = statistics.median(loader_rates["old"]), statistics.median(loader_rates["new"])
        print(f"DataLoader, {args.workers} workers, batch 64 (median of 3, wall): old {rate_old:.0f} images/s, "
              f"new {rate_new:.0f} images/s ({rate_new / rate_old:.2f}x)")


if __name__ == "__main__":
    main()
