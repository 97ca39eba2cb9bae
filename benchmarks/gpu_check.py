"""The first GPU run in one command: everything the CPU tests cannot confirm, as one table (issue 22, item 5).

    python benchmarks/gpu_check.py [--out /tmp/gpu_check] [--skip compile,faiss,...]

Checks (each with its own time limit; the whole script is meant to finish in under 10 minutes):
  collectives  NCCL under strict collectives: 2-rank (1-rank with one GPU) D3P pre-training on the digits,
               replica checksums equal at every saved epoch
  bf16         autocast_dtype("auto") picks bf16 on sm80+; a ViT-B/16 MAE loss under bf16 autocast is finite
               and within 2% of fp32 with the same masking noise
  pinned       uint8 channels-last batches from collate_indexed come out of a pinning DataLoader pinned, in
               channels-last layout, and DeviceNormalize on the GPU equals the CPU normalisation
  train        ViT-B/16 MAE training images/s: fused AdamW + TF32 + bf16, eager and with --compile
  loader       the real pre-training loader (JPEG folder, default --num_workers) images/s, against `train`
  faiss        faiss-gpu exact k-NN (IndexFlatIP) at 1.28M x 768 rows, checked against a torch top-k
  preemption   SIGTERM -> mid-epoch checkpoint of ViT-B/16 + AdamW + D3P state of 1.28M samples (seconds)

On a machine without CUDA it refuses (exit code 2): there is nothing here a CPU can confirm.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from util.run_folder import LOG_FILE  # noqa: E402

CHECKS = ("collectives", "bf16", "pinned", "train", "loader", "faiss", "preemption")
NO_CUDA = ("gpu_check: no CUDA device visible (torch.cuda.is_available() is False). These checks confirm what "
           "only a GPU can (NCCL, bf16, pinned copies, throughput, faiss-gpu); the CPU tests cover the rest. "
           "Fix: run it on a GPU machine, e.g. `python benchmarks/gpu_check.py` on a node of the cluster")


@dataclasses.dataclass
class Row:
    check: str
    status: str  # PASS, FAIL, SKIP, INFO
    value: str
    detail: str = ""


def plan(cuda_devices: int, faiss_gpu: bool, skip: set[str]) -> list[tuple[str, str]]:
    """(check, why it is skipped or "") for every check, in table order. Raises SystemExit without CUDA."""
    if cuda_devices < 1:
        raise SystemExit(NO_CUDA)
    unknown = skip - set(CHECKS)
    if unknown:
        raise SystemExit(f"gpu_check: unknown --skip {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    out = []
    for name in CHECKS:
        why = "--skip" if name in skip else ""
        if name == "faiss" and not why and not faiss_gpu:
            why = "faiss with GPU support is not installed (pip install faiss-gpu-cu12)"
        out.append((name, why))
    return out


def format_table(rows: list[Row]) -> str:
    """One fixed-width table: check | status | value | detail."""
    head = Row("check", "status", "value", "detail")
    widths = [max(len(getattr(r, f)) for r in [head, *rows]) for f in ("check", "status", "value")]
    lines = []
    for r in [head, *rows]:
        lines.append(f"{r.check:<{widths[0]}}  {r.status:<{widths[1]}}  {r.value:>{widths[2]}}  {r.detail}".rstrip())
        if r is head:
            lines.append("-" * max(len(lines[0]), 40))
    return "\n".join(lines)


def _python(args: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------------------ checks
def check_collectives(out: str) -> Row:
    from d3p.collectives import STRICT_COLLECTIVES_ENV

    ranks = min(2, torch.cuda.device_count())
    run_dir = os.path.join(out, "collectives")
    res = _python(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "main_pretrain_d3p.py", "--epochs", "3", "--prune_method", "d3p", "--d3p_start", "2",
                   "--d3p_period", "2", "--d3p_window", "2", "--d3p_bins", "16", "--input_size", "16",
                   "--batch_size", "32", "--train_subset", "512", "--warmup_epochs", "1", "--save_every", "1",
                   "--num_workers", "2", "--output_dir", run_dir], timeout=240, env={STRICT_COLLECTIVES_ENV: "1"})
    if res.returncode != 0:
        return Row("collectives", "FAIL", f"rc {res.returncode}", res.stderr.strip().splitlines()[-1][:150])
    with open(os.path.join(run_dir, LOG_FILE)) as f:
        sums = [json.loads(line).get("replica_checksums") for line in f if line.strip()]
    same = all(s is not None and len(set(s)) == 1 for s in sums)
    return Row("collectives", "PASS" if same else "FAIL", f"{ranks} rank(s)",
               f"NCCL strict collectives, D3P 3 epochs; replica checksums equal: {same}")


def check_bf16() -> Row:
    import models_mae
    from util.amp import autocast_dtype

    picked = autocast_dtype("auto", "cuda")
    model = models_mae.MODELS["mae_vit_base_patch16"]().cuda()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    losses = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)  # the same masking noise
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            losses.append(model(x, mask_ratio=0.75)[0].float().mean().item())
    rel = abs(losses[1] - losses[0]) / abs(losses[0])
    ok = picked == torch.bfloat16 and rel < 0.02 and all(map(lambda v: v == v, losses))
    return Row("bf16", "PASS" if ok else "FAIL", f"{rel:.2e}",
               f"auto -> {picked}; MAE loss fp32 {losses[0]:.4f}, bf16 {losses[1]:.4f} (relative difference)")


def check_pinned() -> Row:
    from torch.utils.data import DataLoader

    from util.device_input import DeviceNormalize
    from util.loader import collate_indexed

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):  # uint8 [C, H, W] with channels-last strides, as the JPEG transforms give
            img = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
            return img.permute(2, 0, 1), 0, i

    loader = DataLoader(Items(), batch_size=32, num_workers=2, pin_memory=True, collate_fn=collate_indexed)
    images, _, _ = next(iter(loader))
    channels_last = images.is_contiguous(memory_format=torch.channels_last)
    stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    on_gpu = DeviceNormalize(stats, "cuda")(images).cpu()
    on_cpu = DeviceNormalize(stats, "cpu")(images)
    same = torch.allclose(on_gpu, on_cpu, atol=1e-6)
    ok = images.is_pinned() and channels_last and same
    return Row("pinned", "PASS" if ok else "FAIL", f"{images.dtype}".replace("torch.", ""),
               f"pinned {images.is_pinned()}, channels-last {channels_last}, GPU normalisation == CPU: {same}")


def train_images_per_second(compile_model: bool, batch_size: int = 128, steps: int = 20) -> float:
    """ViT-B/16 MAE steps as the engine runs them: uint8 batch -> DeviceNormalize, bf16 autocast, fused AdamW."""
    import models_mae
    from util.accel import adamw_kwargs, configure_cuda_math, maybe_compile
    from util.device_input import DeviceNormalize
    from util.engine import autocast

    configure_cuda_math("cuda")
    model = models_mae.MODELS["mae_vit_base_patch16"](norm_pix_loss=True).cuda()
    maybe_compile(model, compile_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), **adamw_kwargs("cuda"))
    to_input = DeviceNormalize(((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "cuda")
    batch = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8).pin_memory()
    warmup = 5 if compile_model else 3
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast("cuda", torch.bfloat16):
            loss = model(to_input(batch), mask_ratio=0.75)[0].float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def check_train(results: dict) -> list[Row]:
    rows = []
    for compiled in (False, True):
        name = "train (compile)" if compiled else "train (eager)"
        try:
            ips = train_images_per_second(compiled)
        except Exception as exc:  # a compile failure is a finding, not a reason to stop the table
            rows.append(Row(name, "FAIL", "-", f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        results[name] = ips
        rows.append(Row(name, "INFO", f"{ips:.0f} img/s", "ViT-B/16 MAE, batch 128, bf16, fused AdamW, TF32"))
    return rows


def check_loader(out: str, results: dict) -> Row:
    import argparse as _argparse

    from benchmarks.bench_loader import build_folder
    from d3p.sampler import PrunedDistributedSampler
    from util.datasets import IndexedDataset, build_dataset
    from util.image_transforms import pretrain_transform
    from util.item_seeding import STREAM_TRAIN
    from util.loader import default_num_workers
    from util.loader import make_loader

    root = os.path.join(out, "jpegs")
    if not os.path.isdir(root):
        build_folder(root, crops_per_photo=32)
        os.makedirs(os.path.join(root, "val"), exist_ok=True)
    args = _argparse.Namespace(data_path=root, data_set="folder", input_size=224, jpeg_upsampling="fast", seed=0,
                               num_workers=default_num_workers(), pin_mem=True, device="cuda", download=False,
                               skip_corrupt=False)
    dataset = IndexedDataset(build_dataset("train", "folder", root, pretrain_transform("folder", 224, "fast")))
    sampler = PrunedDistributedSampler(len(dataset))
    loader = make_loader(dataset, sampler, args, 128, STREAM_TRAIN)
    seen, start = 0, None
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for images, _, _ in loader:
            if start is None:
                start = time.perf_counter()  # after the workers' start and first batch
                continue
            seen += images.shape[0]
    ips = seen / (time.perf_counter() - start)
    train = results.get("train (compile)") or results.get("train (eager)")
    ratio = f", {ips / train:.2f}x the training rate" if train else ""
    return Row("loader", "INFO", f"{ips:.0f} img/s", f"{args.num_workers} workers, 224 px JPEG crops{ratio} "
                                                     "(per process; one process per GPU)")


def check_faiss() -> Row:
    import faiss
    import numpy as np

    n, d, q, k = 1_281_167, 768, 2048, 10
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, d), dtype=np.float32)
    queries = base[rng.choice(n, q, replace=False)]
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatIP(res, d)
    start = time.perf_counter()
    index.add(base)
    _, found = index.search(queries, k)
    seconds = time.perf_counter() - start
    exact = torch.from_numpy(queries[:256]).cuda() @ torch.from_numpy(base).cuda().T
    top = exact.topk(k, dim=1).indices.cpu().numpy()
    agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found[:256], top)]))
    return Row("faiss", "PASS" if agree > 0.999 else "FAIL", f"{seconds:.1f} s",
               f"exact k-NN k={k}, {n} x {d} rows, {q} queries; agreement with torch top-k {agree:.4f}")


def check_preemption(out: str) -> Row:
    res = _python(["benchmarks/bench_checkpoint.py", "--signalled", "--repeats", "2", "--dir", out,
                   "--device", "cuda"], timeout=300)
    if res.returncode != 0:
        return Row("preemption", "FAIL", f"rc {res.returncode}", res.stderr.strip().splitlines()[-1][:150])
    line = res.stdout.strip().splitlines()[-1]
    seconds = line.split("signal -> saved ")[1].split(" s")[0]
    return Row("preemption", "INFO", f"{seconds} s", "SIGTERM -> checkpoint of ViT-B/16 + AdamW + D3P (1.28M) "
                                                     "state, to --out; plus at most one optimizer step")


def run_checks(out: str, skip: set[str]) -> list[Row]:
    try:
        import faiss

        faiss_gpu = hasattr(faiss, "StandardGpuResources")
    except ImportError:
        faiss_gpu = False
    results: dict = {}
    steps: dict[str, Callable[[], list[Row] | Row]] = {
        "collectives": lambda: check_collectives(out), "bf16": check_bf16, "pinned": check_pinned,
        "train": lambda: check_train(results), "loader": lambda: check_loader(out, results),
        "faiss": check_faiss, "preemption": lambda: check_preemption(out),
    }
    rows = []
    for name, why in plan(torch.cuda.device_count() if torch.cuda.is_available() else 0, faiss_gpu, skip):
        if why:
            rows.append(Row(name, "SKIP", "-", why))
            continue
        start = time.perf_counter()
        try:
            got = steps[name]()
        except Exception as exc:
            got = Row(name, "FAIL", "-", f"{type(exc).__name__}: {str(exc)[:150]}")
        rows += got if isinstance(got, list) else [got]
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="scratch folder (checkpoints, a JPEG folder); default: a temporary one")
    p.add_argument("--skip", default="", help=f"comma-separated checks to leave out: {', '.join(CHECKS)}")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    try:
        plan(torch.cuda.device_count() if torch.cuda.is_available() else 0, False, skip)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=args.out) as out:
        name = torch.cuda.get_device_name(0)
        print(f"gpu_check on {torch.cuda.device_count()} x {name}, torch {torch.__version__}")
        rows = run_checks(out, skip)
    print(format_table(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
