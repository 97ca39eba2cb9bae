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

import util  # noqa: F401  (torchvision op schemas on CPU-only torch; must precede timm/torchvision)

import numpy as np
import torch
from timm.optim import param_groups_weight_decay

import models_mae
import d3p
from d3p.distributed import RankDivergenceError
from engine_pretrain import compute_embeddings, forward_only_pass, train_one_epoch
from util import checkpoint as ckpt_util
from util import run
from util.accel import adamw_kwargs, configure_cuda_math, ddp_kwargs, maybe_compile
from util.amp import ScaledOptimizerStep, autocast_dtype
from d3p.collectives import all_gather_object, get_rank, get_world_size
from util.data_errors import DatasetError
from util.datasets import DATA_SETS, IndexedDataset, build_dataset, dataset_stats, resolve_data_set
from util.image_transforms import JPEG_UPSAMPLING, eval_transform, pretrain_transform
from util.item_seeding import STREAM_EMBED, STREAM_FORWARD_ONLY, STREAM_TRAIN
from util.loader import default_num_workers
from util.dist import any_rank, barrier, init_distributed_mode, is_main_process
from util.run_folder import pruning_inputs
from util.run import make_loader  # noqa: F401  (benchmarks/bench_overhead.py builds its loaders with it)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training with D3P data pruning", add_help=True)

    g = parser.add_argument_group("training")
    g.add_argument("--batch_size", default=64, type=int, help="batch size per GPU (effective: batch_size * accum_iter * GPUs)")
    g.add_argument("--epochs", default=400, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype: auto = bf16 on GPUs with native bf16 (sm80+), else fp16; fp32 on CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (in place, before DDP; checkpoint keys unchanged). Off by default")
    g.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)  # tests: "eager"

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, choices=sorted(models_mae.MODELS),
                   help="default: mae_vit_tiny_patch4 for 32x32 data (digits, CIFAR), mae_vit_base_patch16 otherwise")
    g.add_argument("--input_size", default=None, type=int, help="default: 32 for digits/CIFAR, 224 otherwise")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    g.add_argument("--norm_pix_loss", default=True, action=argparse.BooleanOptionalAction,
                   help="per-patch normalised pixels as targets (on by default; --no-norm_pix_loss turns it off)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", type=float, default=1.5e-4, help="base lr per 256 samples")
    g.add_argument("--min_lr", type=float, default=0.0, help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", type=int, default=40)
    g.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm (default: off, as MAE)")

    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default=None, type=str, help="dataset root; leave out for the embedded digits")
    g.add_argument("--data_set", default=None, choices=DATA_SETS,
                   help="default: imagenet (ImageFolder train/ val/) with --data_path, digits without")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data_path")
    g.add_argument("--skip_corrupt", action="store_true",
                   help="replace unreadable images by a neighbour (counted in log.txt) instead of stopping")
    g.add_argument("--train_subset", default=0, type=int,
                   help="train on the first N training samples only (smoke tests, CPU demos); 0 = all")
    g.add_argument("--jpeg_upsampling", default="fast", choices=JPEG_UPSAMPLING,
                   help="chroma upsampling when decoding training crops from JPEG folders: fast = libjpeg's "
                        "merged upsampler (~4%% more images/s per loader core, 0.4 levels mean difference, no "
                        "shift of channel means), fancy = libjpeg's default, pixels as PIL decodes them. "
                        "Evaluation and embedding crops always decode as PIL does")

    run.add_run_args(parser, save_every=20, keep_last=0)  # output, checkpoints, resume, loader, devices
    d3p.add_pruning_args(parser, loss_kind="reconstruction")  # MAE's loss: the published D3P, no rails
    return parser


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations the method forbids, with a message naming the fix (exit code 2)."""
    problems = d3p.validate_pruning_args(args)
    if not 0.0 <= args.mask_ratio < 1.0:
        problems.append(f"--mask_ratio must lie in [0, 1), got {args.mask_ratio}")
    problems += run.run_arg_problems(args)
    if args.train_subset < 0:
        problems.append(f"--train_subset must be >= 0, got {args.train_subset}")
    for name in ("batch_size", "epochs", "accum_iter"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resume and args.auto_resume:
        problems.append("--resume and --auto_resume are exclusive: pick one")
    if args.resume and not os.path.isfile(args.resume):
        problems.append(f"--resume {args.resume}: no such file")
    patch = models_mae.patch_size_of(args.model)
    if args.input_size < patch or args.input_size % patch:
        problems.append(f"--input_size {args.input_size} must be a positive multiple of {args.model}'s patch size "
                        f"{patch}. Fix: --input_size {max(patch, round(args.input_size / patch) * patch)}")
    if args.data_path and not os.path.isdir(args.data_path):
        problems.append(f"--data_path {args.data_path} does not exist (leave it out to use the embedded digits)")
    if problems:
        parser.error("; ".join(problems))


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
class Pretraining:
    """One pre-training run's objects (built once by `build`)."""
    args: argparse.Namespace
    device: torch.device
    dataset: IndexedDataset
    pruner: d3p.DataPruner
    train_loader: torch.utils.data.DataLoader
    forward_loader: torch.utils.data.DataLoader
    model: torch.nn.Module  # DDP-wrapped when distributed
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_scaler: ScaledOptimizerStep
    amp_dtype: torch.dtype | None
    input_stats: tuple  # (mean, std): uint8 batches are normalised on the device with these
    stop: run.StopSignals
    log_writer: object = None
    warned_short_batch: bool = False  # run.warn_short_last_batch has spoken

    def state(self, epoch: int, **extra) -> dict:
        """run.run_state of this run (a collective: every rank calls it)."""
        return run.run_state(self.args, epoch, self.model_without_ddp, self.optimizer, self.loss_scaler,
                             self.pruner, **extra)


def build(args: argparse.Namespace, stop: run.StopSignals) -> Pretraining:
    """Data, pruner, loaders, model (DDP), AdamW and the loss scaler of a run."""
    device = torch.device(args.device)
    world = get_world_size()
    transform = pretrain_transform(args.data_set, args.input_size, args.jpeg_upsampling)
    dataset = IndexedDataset(train_split(args, transform), skip_corrupt=args.skip_corrupt)
    if len(dataset) == 0:
        raise DatasetError(f"the training set under {args.data_path} is empty. Fix: check --data_path")
    print(f"dataset: {args.data_set}, {len(dataset)} training samples")
    pruner = d3p.DataPruner.from_args(args, len(dataset), min_kept=args.batch_size * world, **pruning_inputs(args))
    train_loader = make_loader(dataset, pruner.sampler, args, args.batch_size, STREAM_TRAIN)
    forward_loader = make_loader(dataset, pruner.forward_sampler, args, args.batch_size, STREAM_FORWARD_ONLY)

    model = models_mae.MODELS[args.model](norm_pix_loss=args.norm_pix_loss, img_size=args.input_size)
    model.to(device)
    configure_cuda_math(device)
    maybe_compile(model, args.compile, args.compile_backend)
    model_without_ddp = model
    eff_batch_size = run.effective_batch_size(args)
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"model: {args.model}, effective batch {eff_batch_size}, lr {args.lr:.3e}")
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs(device))
        model_without_ddp = model.module
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), **adamw_kwargs(device))
    amp_dtype = autocast_dtype(args.precision, args.device)
    return Pretraining(args, device, dataset, pruner, train_loader, forward_loader, model, model_without_ddp,
                       optimizer, ScaledOptimizerStep(amp_dtype, args.device), amp_dtype, dataset_stats(args.data_set),
                       stop)


def resume(r: Pretraining) -> dict | None:
    """Restore the newest checkpoint (--auto_resume) or --resume's -> its mid-epoch record, if any."""
    found = run.find_or_load(r.args)
    if found is None:
        return None
    path, checkpoint = found
    if "pruning" not in checkpoint:
        raise ckpt_util.ResumeMismatchError(
            f"checkpoint {path} has no pruning state: it is not a pre-training checkpoint of this script. "
            "Fix: pass a checkpoint written by main_pretrain_d3p.py, or start without --resume"
        )
    r.args.start_epoch = run.restore_run_state(checkpoint, path, r.model_without_ddp, r.optimizer, r.loss_scaler,
                                               r.pruner, r.args.model)
    if is_main_process():
        run.rewrite_log_until(os.path.join(r.args.output_dir, "log.txt"), r.args.start_epoch - 1)
    partial = checkpoint.get("partial_epoch")
    if partial is None:
        return None
    return {**partial, "_written_by": {k: checkpoint.get(k) for k in ("world_size", "args")}}


def main(args: argparse.Namespace) -> int:
    init_distributed_mode(args)
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    print(json.dumps({k: v for k, v in vars(args).items()}, default=str))
    rank = get_rank()
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    stop = run.StopSignals()
    r = build(args, stop)
    os.makedirs(args.output_dir, exist_ok=True)
    partial = resume(r)
    r.log_writer = run.summary_writer(args.log_dir)

    print(f"Start training for {args.epochs} epochs from epoch {args.start_epoch} ({args.prune_method})")
    run_start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        code = train_epoch(r, epoch, partial if partial is not None and partial["epoch"] == epoch else None)
        partial = None
        if code is not None:
            return code

    print(f"Training time {datetime.timedelta(seconds=int(time.time() - run_start))}")
    summary = {"mode": "pretrain", "model": args.model, "data_set": args.data_set, **r.pruner.summary()}
    run.write_summary(args.output_dir, summary)
    if r.log_writer is not None:
        r.log_writer.close()
    stop.restore()
    barrier()
    return 0


def train_epoch(r: Pretraining, epoch: int, partial: dict | None) -> int | None:
    """One epoch: training, the passes without gradient, the method's decision, log and checkpoint.
    Returns run.EXIT_STOPPED after saving when the ranks agreed to stop, else None."""
    args, pruner = r.args, r.pruner
    epoch_start = time.time()
    pruner.begin_epoch(epoch)
    r.warned_short_batch = run.warn_short_last_batch(r.train_loader, epoch, r.warned_short_batch)
    start_step, carried = 0, None
    if partial is not None:
        start_step, carried = run.resume_partial_epoch(partial, partial["_written_by"], pruner)
        carried = carried_of_this_rank(carried)
        epoch_start -= carried["seconds"]
    train_stats = train_one_epoch(
        r.model, r.train_loader, r.optimizer, r.device, epoch, r.loss_scaler, log_writer=r.log_writer, args=args,
        pruner=pruner, amp_dtype=r.amp_dtype, start_step=start_step, carried=carried, stop_requested=r.stop,
        input_stats=r.input_stats,
    )
    step = train_stats["interrupted_at_step"]
    if step is not None:
        save_partial(r, epoch, train_stats, step, start_step, epoch_start)
        return run.stopped(r.stop, f"stopped by signal in epoch {epoch} after step {step}")
    # the passes without gradient; a SIGTERM during them saves the state from before them (RNG
    # included, and no partial records), so the resume replays them whole
    rng_before_passes = ckpt_util.rng_state()
    embeddings, stopped_in_pass = no_grad_passes(r, epoch)
    if stopped_in_pass:
        ckpt_util.set_rng_state(rng_before_passes)
        step = start_step + len(r.train_loader)  # every training step done
        save_partial(r, epoch, train_stats, step, start_step, epoch_start)
        return run.stopped(r.stop, f"stopped by signal in epoch {epoch} after training, during its "
                                   "forward-only/embedding pass")
    pruning_log = pruner.end_epoch(epoch, embeddings, optimizer_steps=train_stats["optimizer_steps"],
                                   data_seconds=train_stats["data_seconds"], started=epoch_start)
    strategy = pruner.strategy
    subset = getattr(strategy, "subset", None)  # static methods: the fixed coreset, once selected
    if subset is not None and is_main_process() and epoch == strategy.warmup_epochs - 1:
        np.save(os.path.join(args.output_dir, "kept_static.npy"), subset)

    stop_now = any_rank(r.stop())  # every rank must take the same branch (collectives below)
    save = run.is_save_epoch(args, epoch) or stop_now
    log_stats = {
        "epoch": epoch,
        "train_loss": train_stats["train_loss"],
        "lr": train_stats["lr"],
        "grad_norm": train_stats["grad_norm"],
        **pruning_log,
        "corrupt_replaced": train_stats["corrupt_replaced"],
    }
    if save:
        log_stats["replica_checksums"] = check_replicas(r.model_without_ddp, epoch)
    # log first, checkpoint second: a crash in between replays this epoch, and the resume
    # drops this line before writing it again (run.rewrite_log_until)
    run.append_log(args.output_dir, log_stats)
    run.write_epoch_tensorboard(r.log_writer, epoch, log_stats, strategy)
    if save:
        run.save_epoch_checkpoint(args, epoch, r.state(epoch))
    if stop_now:
        return run.stopped(r.stop, f"stopped by signal after epoch {epoch}")
    return None


def no_grad_passes(r: Pretraining, epoch: int) -> tuple[np.ndarray | None, bool]:
    """D2's embedding pass and the forward-only pass (D3P's pruned samples in recording epochs), when the
    epoch needs them -> (embeddings or None, whether the ranks agreed to stop during them)."""
    args, pruner = r.args, r.pruner
    polled = dict(stop_requested=r.stop, print_freq=args.print_freq, input_stats=r.input_stats)
    embeddings = None
    if pruner.needs_embeddings:  # consumes no RNG (eval transform, unmasked encoder)
        embed_set = IndexedDataset(train_split(args, eval_transform(args.data_set, args.input_size)))
        embed_loader = make_loader(embed_set, pruner.embedding_sampler(), args, args.batch_size, STREAM_EMBED)
        embeddings, _ = compute_embeddings(r.model, embed_loader, r.device, pruner.num_samples, r.amp_dtype,
                                           **polled)
        if embeddings is None:
            return None, True
    if pruner.forward_only_indices.size:
        seen = forward_only_pass(r.model_without_ddp, r.forward_loader, r.device, epoch, pruner, args.mask_ratio,
                                 r.amp_dtype, **polled)
        if seen is None:
            return None, True
    return embeddings, False


def save_partial(r: Pretraining, epoch: int, train_stats: dict, step: int, start_step: int,
                 epoch_start: float) -> None:
    """The mid-epoch checkpoint after `step` steps of `epoch` (run.save_partial_epoch)."""
    local = min(len(r.pruner.sampler), (step - start_step) * r.args.batch_size)  # this run's samples per rank
    # every rank's running loss sum (the epoch's train_loss is the mean of the ranks' means): a collective
    totals = all_gather_object((float(train_stats["loss_total"]), int(train_stats["loss_steps"])))
    run.save_partial_epoch(
        r.args, epoch, r.state(epoch - 1), step, r.pruner.sampler.samples_done(local), time.time() - epoch_start,
        r.pruner, loss_total=float(train_stats["loss_total"]), loss_steps=int(train_stats["loss_steps"]),
        rank_losses=[list(t) for t in totals], optimizer_steps=int(train_stats["optimizer_steps"]),
    )


def carried_of_this_rank(partial: dict) -> dict:
    """The interrupted part's statistics as this rank continues them: its own loss sum when the world size
    is the same (rank_losses), else rank 0 carries all ranks' sums and the others none."""
    carried = dict(partial)
    per_rank = partial.get("rank_losses")
    if per_rank is None:
        return carried
    if len(per_rank) == get_world_size():
        carried["loss_total"], carried["loss_steps"] = per_rank[get_rank()]
    else:
        mine = is_main_process()
        carried["loss_total"] = sum(t for t, _ in per_rank) if mine else 0.0
        carried["loss_steps"] = sum(n for _, n in per_rank) if mine else 0
    return carried


def check_replicas(model, epoch: int) -> list[str]:
    """All ranks' weight hashes; stop rather than save diverged replicas."""
    checksums = ckpt_util.replica_checksums(model)  # collective: all ranks
    if len(set(checksums)) != 1:
        raise RankDivergenceError(
            f"epoch {epoch}: model replicas differ across ranks ({checksums}); not saving a checkpoint of "
            "diverged weights. Fix: restart from the last checkpoint with --auto_resume"
        )
    return checksums


def cli(argv: list[str] | None = None) -> int:
    d3p.import_prune_plugins(argv)  # a --prune_plugin's method and options must be flags before parsing
    parser = get_args_parser()
    args = parser.parse_args(argv)
    fill_defaults(args)
    validate_args(parser, args)
    return run.run_main(main, args)


if __name__ == "__main__":
    sys.exit(cli())
