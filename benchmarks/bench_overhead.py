"""Cost of the pruning machinery per trained sample, against `--prune_method none`.

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py [--epochs 12] [--method d3p] 2>/dev/null

One process, two arms over the same data and two copies of the same initial model: `none` and `--method`,
alternated epoch by epoch (none, method, method, none, none, ...) so that machine noise (other jobs, thermal state)
hits both alike. Each arm's epoch is timed from `begin_epoch` (plan, fingerprint, sampler rebuild) through
training (per-sample weights and loss recording for the pruning arm) to `end_epoch` + the ledger (reduction and
the decision), and divided by the samples trained in it. D3P's forward-only loss passes over the pruned set are
extra compute, not machinery: they are timed and printed separately (the ledger charges them as forward-only
samples). Prints seconds per trained sample for both arms and their ratio (goal: <= 1.01).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.torchvision_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import torch  # noqa: E402
from timm.optim import param_groups_weight_decay  # noqa: E402

import main_pretrain_d3p as mp  # noqa: E402
import models_mae  # noqa: E402
import d3p  # noqa: E402
from engine_pretrain import MAELoss  # noqa: E402
from util.engine import forward_only_pass, train_one_epoch  # noqa: E402
from util.amp import ScaledOptimizerStep  # noqa: E402
from util.datasets import IndexedDataset, dataset_stats  # noqa: E402
from util.image_transforms import pretrain_transform  # noqa: E402
from util.item_seeding import STREAM_FORWARD_ONLY, STREAM_TRAIN  # noqa: E402


class Arm:
    """One method's model, optimizer, samplers, loaders and pruner; timings per epoch."""

    def __init__(self, method: str, args: argparse.Namespace, dataset, state: dict):
        self.args = argparse.Namespace(**{**vars(args), "prune_method": method})
        n = len(dataset)
        self.model = models_mae.MODELS[args.model](norm_pix_loss=True, img_size=args.input_size)
        self.model.load_state_dict(state)
        self.optimizer = torch.optim.AdamW(param_groups_weight_decay(self.model, 0.05), lr=args.lr, betas=(0.9, 0.95))
        self.scaler = ScaledOptimizerStep(None, "cpu")
        self.pruner = d3p.DataPruner.from_args(self.args, n, min_kept=args.batch_size)
        self.train_loader = mp.make_loader(dataset, self.pruner.sampler, self.args, args.batch_size, STREAM_TRAIN)
        self.forward_loader = mp.make_loader(dataset, self.pruner.forward_sampler, self.args, args.batch_size,
                                             STREAM_FORWARD_ONLY)
        self.stats = dataset_stats(args.data_set)
        self.seconds, self.trained, self.forward_seconds = [], [], []

    def epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        self.pruner.begin_epoch(epoch)
        mae_loss = MAELoss(self.model, torch.device("cpu"), self.args.mask_ratio, input_stats=self.stats)
        meters = train_one_epoch(self.model, self.train_loader, self.optimizer, self.scaler, epoch, self.args,
                                 mae_loss, pruner=self.pruner).meters
        t1 = time.perf_counter()
        if self.pruner.forward_only_indices.size:  # extra compute, timed apart from the machinery
            forward_only_pass(self.model, self.forward_loader, mae_loss, self.pruner, epoch)
        t2 = time.perf_counter()
        self.pruner.end_epoch(epoch, optimizer_steps=meters.optimizer_steps, data_seconds=meters.data_seconds,
                              started=t0)
        t3 = time.perf_counter()
        self.seconds.append((t1 - t0) + (t3 - t2))
        self.forward_seconds.append(t2 - t1)
        self.trained.append(self.pruner.sampler.total_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="d3p", choices=["d3p", "infobatch", "seta", "random"])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--input_size", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--train_subset", type=int, default=0, help="first N digits only (0: all 1,500)")
    cli = p.parse_args()
    flags = ["--input_size", str(cli.input_size), "--batch_size", str(cli.batch_size), "--epochs", str(cli.epochs),
             "--warmup_epochs", "1", "--blr", "1.5e-3", "--num_workers", "0", "--print_freq", "20",
             "--d3p_start", "2", "--d3p_period", "3", "--d3p_window", "2", "--d3p_bins", "32",
             "--train_subset", str(cli.train_subset)]
    args = mp.get_args_parser().parse_args(flags)
    mp.fill_defaults(args)
    args.device, args.distributed = "cpu", False
    args.lr = args.blr * args.batch_size / 256
    dataset = IndexedDataset(mp.train_split(args, pretrain_transform(args.data_set, args.input_size, args.jpeg_upsampling)))
    torch.manual_seed(0)
    state = models_mae.MODELS[args.model](norm_pix_loss=True, img_size=args.input_size).state_dict()
    arms = [Arm("none", args, dataset, state), Arm(cli.method, args, dataset, state)]
    print(f"{len(dataset)} samples, {args.model} at {args.input_size} px, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}; arms alternate epoch by epoch")
    print(f"{'epoch':>5} {'none s/sample':>14} {cli.method + ' s/sample':>14} {'ratio':>7} {cli.method + ' kept':>10} "
          f"{'fwd-only s':>10}")
    for epoch in range(cli.epochs):
        for arm in (arms if epoch % 2 == 0 else arms[::-1]):  # alternate which arm goes first, too
            arm.epoch(epoch)
        base, other = arms
        r0, r1 = base.seconds[-1] / base.trained[-1], other.seconds[-1] / other.trained[-1]
        print(f"{epoch:>5} {r0 * 1e3:>12.3f}ms {r1 * 1e3:>12.3f}ms {r1 / r0:>7.3f} {other.trained[-1]:>10} "
              f"{other.forward_seconds[-1]:>10.2f}")
    skip = 1  # the first epoch of each arm warms caches and allocators
    base, other = arms
    s0 = sum(base.seconds[skip:]) / sum(base.trained[skip:])
    s1 = sum(other.seconds[skip:]) / sum(other.trained[skip:])
    fwd = sum(other.forward_seconds[skip:]) / sum(other.trained[skip:])
    print(f"seconds per trained sample (epochs {skip}..{cli.epochs - 1}): none {s0 * 1e3:.4f} ms, "
          f"{cli.method} {s1 * 1e3:.4f} ms")
    ratios = sorted((o / ot) / (b / bt) for b, bt, o, ot in zip(base.seconds[skip:], base.trained[skip:],
                                                                other.seconds[skip:], other.trained[skip:]))
    print(f"per-epoch ratios: median {ratios[len(ratios) // 2]:.3f}, range {ratios[0]:.3f}..{ratios[-1]:.3f} "
          "(a wide range means a loaded machine: rerun it idle)")
    print(f"machinery overhead ratio {cli.method}/none: {s1 / s0:.4f} (goal <= 1.01); forward-only passes add "
          f"{fwd / s0:.3f} of a trained sample's time per trained sample (charged in the ledger, not machinery)")


if __name__ == "__main__":
    main()
