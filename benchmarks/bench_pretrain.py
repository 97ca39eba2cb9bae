"""Pre-training throughput (images/s) of an MAE model on this machine: forward + backward + AdamW step.

    python benchmarks/bench_pretrain.py [--model mae_vit_tiny_patch4] [--sizes 16 32] [--batch_size 64]

Synthetic inputs (data loading excluded: see `data_seconds` in a run's log.txt for that).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import models_mae  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_tiny_patch4", choices=sorted(models_mae.MODELS))
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}")
    print(f"{'model':>22} {'input':>6} {'images/s':>10} {'ms/step':>9}")
    for size in args.sizes:
        torch.manual_seed(0)
        model = models_mae.MODELS[args.model](img_size=size, norm_pix_loss=True).to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        x = torch.randn(args.batch_size, 3, size, size, device=args.device)
        for i in range(args.steps + 3):  # 3 warm-up steps
            if i == 3:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
            loss, _, _ = model(x, mask_ratio=0.75)
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = (time.perf_counter() - start) / args.steps
        print(f"{args.model:>22} {size:>6} {args.batch_size / dt:>10.1f} {dt * 1000:>9.1f}")


if __name__ == "__main__":
    main()
