"""MAE pre-training with built-in dynamic data pruning (D3P by default).

Single process:   python main_pretrain_d3p.py                      (embedded digits, tiny model, CPU ok)
Multi-GPU/node:   torchrun --nproc_per_node 8 main_pretrain_d3p.py --data_path /data/imagenet ...
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import sys
import time

from util.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # CPU-only torch: torchvision's op schemas, before timm/torchvision

import numpy as np
import torch
from timm.optim import param_groups_weight_decay

import models_mae
import d3p
from engine_pretrain import MAELoss, compute_embeddings
from util import flags, lifecycle, run, run_folder, run_log
from util.accel import adamw_kwargs, configure_cuda_math, ddp_kwargs, maybe_compile
from util.amp import ScaledOptimizerStep, autocast_dtype
from d3p.collectives import get_rank, get_world_size
from util.data_errors import DatasetError
from util.datasets import IndexedDataset, build_dataset, dataset_stats, resolve_data_set
from util.image_transforms import eval_transform, pretrain_transform
from util.item_seeding import STREAM_EMBED, STREAM_FORWARD_ONLY, STREAM_TRAIN
from util.loader import default_num_workers
from util.dist import barrier, init_distributed_mode, is_main_process
from util.loader import make_loader
from util.run_folder import pruning_inputs
from util.stop import StopSignals


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training with D3P data pruning", add_help=True)

    flags.add_training_args(parser, epochs=400)

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, choices=sorted(models_mae.MODELS),
                   help="default: mae_vit_tiny_patch4 for 32x32 data (digits, CIFAR), mae_vit_base_patch16 otherwise")
    g.add_argument("--input_size", default=None, type=int, help="default: 32 for digits/CIFAR, 224 otherwise")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    g.add_argument("--norm_pix_loss", default=True, action=argparse.BooleanOptionalAction,
                   help="per-patch normalised pixels as targets (on by default; --no-norm_pix_loss turns it off)")

    flags.add_optimizer_args(parser, "optimizer (AdamW)", weight_decay=0.05, blr=1.5e-4, min_lr=0.0, warmup_epochs=40)

    g = flags.add_data_args(parser, "data", jpeg_help=". Evaluation and embedding crops always decode as PIL does")
    g.add_argument("--skip_corrupt", action="store_true",
                   help="replace unreadable images by a neighbour (counted in log.txt) instead of stopping")
    g.add_argument("--train_subset", default=0, type=int,
                   help="train on the first N training samples only (smoke tests, CPU demos); 0 = all")

    flags.add_run_args(parser, save_every=20, keep_last=0)  # output, checkpoints, resume, loader, devices
    d3p.add_pruning_args(parser, loss_kind="reconstruction")  # MAE's loss: the published D3P, no rails
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Refuse flag combinations the method forbids: a ConfigError naming each flag and its fix (exit code 2)."""
    problems = flags.shared_arg_problems(args) + d3p.validate_pruning_args(args)
    if not 0.0 <= args.mask_ratio < 1.0:
        problems.append(f"--mask_ratio must lie in [0, 1), got {args.mask_ratio}")
    if args.train_subset < 0:
        problems.append(f"--train_subset must be >= 0, got {args.train_subset}")
    patch = models_mae.patch_size_of(args.model)
    if args.input_size < patch or args.input_size % patch:
        problems.append(f"--input_size {args.input_size} must be a positive multiple of {args.model}'s patch size "
                        f"{patch}. Fix: --input_size {max(patch, round(args.input_size / patch) * patch)}")
    flags.raise_problems(problems)


def fill_defaults(args: argparse.Namespace) -> None:
    """Defaults that depend on the data: small models and inputs for the 32x32 data sets."""
    args.data_set = resolve_data_set(args.data_set, args.data_path)
    small = args.data_set in ("digits", "cifar10", "cifar100")
    if args.input_size is None:
        args.input_size = 32 if small else 224
    if args.model is None:
        args.model = "mae_vit_tiny_patch4" if small else "mae_vit_base_patch16"
    if args.log_dir is None:
        args.log_dir = args.output_dir
    if args.num_workers is None:
        args.num_workers = default_num_workers()


def train_split(args, transform):
    """The training set, or its first --train_subset samples."""
    dataset = build_dataset("train", args.data_set, args.data_path, transform, args.download)
    if args.train_subset:
        dataset = torch.utils.data.Subset(dataset, range(min(args.train_subset, len(dataset))))
    return dataset



@dataclasses.dataclass
class Pretraining(lifecycle.TrainingRun):
    """One pre-training run (built once by `build`): MAE's loss, D2's embedding pass, the pre-training log line."""
    dataset: IndexedDataset = None

    def batch_losses(self, epoch: int, forward_only: bool = False) -> MAELoss:
        # the forward-only pass runs the unwrapped model: a DDP forward outside a backward would wait for gradients
        model = self.model_without_ddp if forward_only else self.model
        return MAELoss(model, self.device, self.args.mask_ratio, self.amp_dtype, self.input_stats)

    def embeddings(self, epoch: int) -> tuple[np.ndarray | None, bool]:
        """D2's embeddings of every training sample (eval transform, unmasked encoder: no RNG consumed)."""
        args = self.args
        embed_set = IndexedDataset(train_split(args, eval_transform(args.data_set, args.input_size)))
        loader = make_loader(embed_set, self.pruner.embedding_sampler(), args, args.batch_size, STREAM_EMBED)
        embeddings, _ = compute_embeddings(self.model, loader, self.device, self.pruner.num_samples, self.amp_dtype,
                                           input_stats=self.input_stats, stop_requested=self.stop,
                                           print_freq=args.print_freq)
        return embeddings, embeddings is None

    def after_decision(self, epoch: int) -> None:
        strategy = self.pruner.strategy
        subset = getattr(strategy, "subset", None)  # static methods: the fixed coreset, once selected
        if subset is not None and is_main_process() and epoch == strategy.warmup_epochs - 1:
            np.save(os.path.join(self.args.output_dir, run_folder.STATIC_SUBSET_FILE), subset)

    def log_line(self, epoch: int, train: dict, pruning_log: dict) -> dict:
        return {"epoch": epoch, "train_loss": train["loss"], "lr": train["last_lr"], "grad_norm": train["grad_norm"],
                **pruning_log, "corrupt_replaced": train["corrupt_replaced"]}


def build(args: argparse.Namespace, stop: StopSignals) -> Pretraining:
    """Data, pruner, loaders, model (DDP), AdamW and the loss scaler of a run."""
    device = torch.device(args.device)
    world = get_world_size()
    transform = pretrain_transform(args.data_set, args.input_size, args.jpeg_upsampling)
    dataset = IndexedDataset(train_split(args, transform), skip_corrupt=args.skip_corrupt)
    if len(dataset) == 0:
        raise DatasetError(f"the training set under {args.data_path} is empty. Fix: check --data_path")
    print(f"dataset: {args.data_set}, {len(dataset)} training samples")
    pruner = d3p.DataPruner.from_args(args, len(dataset), min_kept=args.batch_size * world, **pruning_inputs(args))
    train_loader = make_loader(dataset, pruner.sampler, args, args.batch_size, STREAM_TRAIN, drop_last=args.drop_last)
    forward_loader = make_loader(dataset, pruner.forward_sampler, args, args.batch_size, STREAM_FORWARD_ONLY)

    model = models_mae.MODELS[args.model](norm_pix_loss=args.norm_pix_loss, img_size=args.input_size)
    model.to(device)
    configure_cuda_math(device)
    maybe_compile(model, args.compile, args.compile_backend)
    model_without_ddp = model
    eff_batch_size = flags.effective_batch_size(args)
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"model: {args.model}, effective batch {eff_batch_size}, lr {args.lr:.3e}")
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs(device))
        model_without_ddp = model.module
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), **adamw_kwargs(device))
    amp_dtype = autocast_dtype(args.precision, args.device)
    return Pretraining(args, device, amp_dtype, dataset_stats(args.data_set), pruner, train_loader, forward_loader,
                       model, model_without_ddp, optimizer, ScaledOptimizerStep(amp_dtype, args.device), stop,
                       dataset=dataset)


def main(args: argparse.Namespace) -> int:
    init_distributed_mode(args)
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    print(json.dumps({k: v for k, v in vars(args).items()}, default=str))
    torch.manual_seed(args.seed + get_rank())
    random.seed(args.seed + get_rank())
    r = build(args, StopSignals())
    lifecycle.output_dir_ready(args)
    point = lifecycle.load_checkpoint_into(r, fix="resume with the same --model/--input_size")
    r.log_writer = run_log.summary_writer(args.log_dir)

    start = point.start_epoch if point is not None else args.start_epoch
    print(f"Start training for {args.epochs} epochs from epoch {start} ({args.prune_method})")
    run_start = time.time()
    code = lifecycle.run_epochs(r, point)
    if code is not None:
        return code
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - run_start))}")
    lifecycle.write_summary_and_close(
        r, {"mode": "pretrain", "model": args.model, "data_set": args.data_set, **r.pruner.summary()})
    barrier()
    return 0


def configure_and_run(args: argparse.Namespace) -> int:
    """Fill the data-dependent defaults, refuse bad flags (ConfigError), then train."""
    fill_defaults(args)
    validate_args(args)
    return main(args)


def cli(argv: list[str] | None = None) -> int:
    d3p.import_prune_plugins(argv)  # a --prune_plugin's method and options must be flags before parsing
    args = get_args_parser().parse_args(argv)
    return run.run_main(configure_and_run, args)  # bad flags: the message and exit code 2, as every entry script


if __name__ == "__main__":
    sys.exit(cli())
