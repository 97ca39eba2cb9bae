"""Time of one pre-training checkpoint save (model + AdamW state + scaler), against torchrun's grace period.

    python benchmarks/bench_checkpoint.py [--model mae_vit_base_patch16] [--dir /path/on/the/checkpoint/disk]

On SIGTERM the ranks finish the current step, agree, and rank 0 writes this file (atomic_torch_save: write,
fsync, rename). torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default 30 s) before SIGKILL.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import util  # noqa: F401,E402  (before timm/torchvision)

import torch  # noqa: E402

import models_mae  # noqa: E402
from util.checkpoint import atomic_torch_save  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mae_vit_base_patch16", choices=sorted(models_mae.MODELS))
    parser.add_argument("--dir", default=None, help="folder to write to (default: a temporary folder)")
    parser.add_argument("--repeats", default=3, type=int)
    args = parser.parse_args()

    model = models_mae.MODELS[args.model]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    for p in model.parameters():  # one zero-gradient step creates AdamW's two moment buffers
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = os.path.join(folder, "checkpoint-0.pth")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            atomic_torch_save(state, path)
            times.append(time.perf_counter() - start)
        size = os.path.getsize(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.1f}M parameters, checkpoint {size / 2**30:.2f} GiB, "
          f"save {min(times):.1f}-{max(times):.1f} s ({size / 2**20 / min(times):.0f} MiB/s)")


if __name__ == "__main__":
    main()
