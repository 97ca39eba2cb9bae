"""MAE pre-training with built-in dynamic data pruning (D3P by default).

Single process:   python main_pretrain_d3p.py                      (embedded digits, tiny model, CPU ok)
Multi-GPU/node:   torchrun --nproc_per_node 8 main_pretrain_d3p.py --data_path /data/imagenet ...
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import sys
import time

import util  # noqa: F401  (torchvision op schemas on CPU-only torch; must precede timm/torchvision)

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

import models_mae
import d3p
from d3p.collectives import get_rank, get_world_size
from d3p.distributed import RankDivergenceError
from engine_pretrain import NonFiniteLossError, compute_embeddings, forward_only_pass, train_one_epoch
from util import checkpoint as ckpt_util
from util.accel import adamw_kwargs, configure_cuda_math, ddp_kwargs, maybe_compile
from util.amp import ScaledOptimizerStep, autocast_dtype
from util.data_errors import DatasetError
from util.datasets import DATA_SETS, IndexedDataset, build_dataset, dataset_stats, resolve_data_set
from util.image_transforms import JPEG_UPSAMPLING, eval_transform, pretrain_transform
from util.item_seeding import STREAM_EMBED, STREAM_FORWARD_ONLY, STREAM_TRAIN, ItemSeedSampler, SeededItems
from util.loader import collate_indexed, default_num_workers
from util.dist import any_rank, barrier, cleanup, init_distributed_mode, is_main_process
from util.run_folder import pruning_inputs


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training with D3P data pruning", add_help=True)

    g = parser.add_argument_group("training")
    g.add_argument("--batch_size", default=64, type=int, help="batch size per GPU (effective: batch_size * accum_iter * GPUs)")
    g.add_argument("--epochs", default=400, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype: auto = bf16 on GPUs with native bf16 (sm80+), else fp16; fp32 on CPU")
    g.add_argument("--print_freq", default=20, type=int, help="steps between host syncs for logging and NaN checks")
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
    g.add_argument("--num_workers", default=None, type=int,
                   help="loader workers per process (default: this process's CPUs / processes per node, <= 16)")
    g.add_argument("--pin_mem", default=True, action=argparse.BooleanOptionalAction)
    g.add_argument("--jpeg_upsampling", default="fast", choices=JPEG_UPSAMPLING,
                   help="chroma upsampling when decoding training crops from JPEG folders: fast = libjpeg's "
                        "merged upsampler (~4%% more images/s per loader core, 0.4 levels mean difference, no "
                        "shift of channel means), fancy = libjpeg's default, pixels as PIL decodes them. "
                        "Evaluation and embedding crops always decode as PIL does")

    g = parser.add_argument_group("output and resume")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, summary.json")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    g.add_argument("--save_every", default=20, type=int, help="checkpoint every N epochs, plus the last")
    g.add_argument("--keep_last", default=0, type=int,
                   help="keep only the newest K epoch checkpoints (0: keep all, as MAE; ViT-B: ~1.3 GB each)")
    g.add_argument("--resume", default="", help="checkpoint to resume from")
    g.add_argument("--auto_resume", action="store_true", help="resume from the newest complete checkpoint in --output_dir")
    g.add_argument("--start_epoch", default=0, type=int)
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")

    g = parser.add_argument_group("distributed")
    g.add_argument("--world_size", default=1, type=int)
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="set by the launcher (either spelling)")
    g.add_argument("--dist_url", default="env://")
    g.add_argument("--dist_timeout_min", default=30, type=int, help="collective timeout in minutes")

    d3p.add_pruning_args(parser)
    return parser


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations the method forbids, with a message naming the fix (exit code 2)."""
    problems = d3p.validate_pruning_args(args)
    if not 0.0 <= args.mask_ratio < 1.0:
        problems.append(f"--mask_ratio must lie in [0, 1), got {args.mask_ratio}")
    if args.keep_last < 0:
        problems.append(f"--keep_last must be >= 0, got {args.keep_last}")
    if args.train_subset < 0:
        problems.append(f"--train_subset must be >= 0, got {args.train_subset}")
    for name in ("batch_size", "epochs", "accum_iter", "save_every", "print_freq"):
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


class _StopRequested(Exception):
    pass


def _install_sigterm_handler() -> dict:
    """A scheduler's SIGTERM sets a flag; the ranks agree at the next host-sync point, save a
    mid-epoch checkpoint (or the epoch's, if the epoch was over) and exit non-zero (143)."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True
        print(f"received signal {signum}: will save a checkpoint after this epoch and exit", force=True)

    signal.signal(signal.SIGTERM, handler)
    return flag


def make_loader(dataset, sampler, args, batch_size: int, stream: int) -> DataLoader:
    """A loader whose augmentation is a function of (seed, stream, epoch, rank, position) in worker
    processes (util.item_seeding.SeededItems), so a resume with workers replays it exactly."""
    return DataLoader(
        SeededItems(dataset), sampler=ItemSeedSampler(sampler, args.seed, get_rank(), stream),
        batch_size=batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and args.device.startswith("cuda"), drop_last=False,
        persistent_workers=args.num_workers > 0, collate_fn=collate_indexed,
        generator=torch.Generator(),  # creating an iterator never draws from the global RNG
    )


def train_split(args, transform):
    """The training set, or its first --train_subset samples."""
    dataset = build_dataset("train", args.data_set, args.data_path, transform, args.download)
    if args.train_subset:
        dataset = torch.utils.data.Subset(dataset, range(min(args.train_subset, len(dataset))))
    return dataset


def rewrite_log_until(path: str, last_epoch: int) -> None:
    """On resume, drop log lines of epochs after the checkpoint: they are about to be replayed."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [ln for ln in lines if not ln.strip() or json.loads(ln).get("epoch", -1) <= last_epoch]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def main(args: argparse.Namespace) -> int:
    init_distributed_mode(args)
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    print(json.dumps({k: v for k, v in vars(args).items()}, default=str))
    device = torch.device(args.device)
    rank, world = get_rank(), get_world_size()

    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)

    # ---------------------------------------------------------------- data
    transform = pretrain_transform(args.data_set, args.input_size, args.jpeg_upsampling)
    dataset = IndexedDataset(train_split(args, transform), skip_corrupt=args.skip_corrupt)
    num_samples = len(dataset)
    if num_samples == 0:
        raise DatasetError(f"the training set under {args.data_path} is empty. Fix: check --data_path")
    print(f"dataset: {args.data_set}, {num_samples} training samples")
    pruner = d3p.DataPruner.from_args(args, num_samples, min_kept=args.batch_size * world, **pruning_inputs(args))
    train_loader = make_loader(dataset, pruner.sampler, args, args.batch_size, STREAM_TRAIN)
    forward_loader = make_loader(dataset, pruner.forward_sampler, args, args.batch_size, STREAM_FORWARD_ONLY)

    # --------------------------------------------------------------- model
    model = models_mae.MODELS[args.model](norm_pix_loss=args.norm_pix_loss, img_size=args.input_size)
    model.to(device)
    configure_cuda_math(device)
    maybe_compile(model, args.compile, args.compile_backend)
    model_without_ddp = model
    eff_batch_size = args.batch_size * args.accum_iter * world
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f"model: {args.model}, effective batch {eff_batch_size}, lr {args.lr:.3e}")
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs(device))
        model_without_ddp = model.module
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), **adamw_kwargs(device))
    amp_dtype = autocast_dtype(args.precision, args.device)
    loss_scaler = ScaledOptimizerStep(amp_dtype, args.device)

    # -------------------------------------------------------------- resume
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "log.txt")
    resume_path, checkpoint = args.resume, None
    if args.auto_resume:
        found = ckpt_util.find_resume_checkpoint(args.output_dir)  # rank 0 chooses for all ranks
        if found:
            resume_path, checkpoint = found
    elif args.resume:
        checkpoint = ckpt_util.load_checkpoint(args.resume)
    if checkpoint is not None:
        load_training_state(checkpoint, resume_path, args, model_without_ddp, optimizer, loss_scaler, pruner)
        if is_main_process():
            rewrite_log_until(log_path, args.start_epoch - 1)

    log_writer = SummaryWriter(log_dir=args.log_dir) if is_main_process() else None
    stop = _install_sigterm_handler()

    print(f"Start training for {args.epochs} epochs from epoch {args.start_epoch} ({args.prune_method})")
    run_start = time.time()
    partial = checkpoint.get("partial_epoch") if checkpoint is not None else None
    input_stats = dataset_stats(args.data_set)  # uint8 batches are normalised on the device with these
    for epoch in range(args.start_epoch, args.epochs):
        epoch_start = time.time()
        pruner.begin_epoch(epoch)
        start_step, carried = 0, None
        if partial is not None and partial["epoch"] == epoch:
            start_step, carried = resume_partial_epoch(partial, pruner, args)
            epoch_start -= carried["seconds"]
        partial = None
        train_stats = train_one_epoch(
            model, train_loader, optimizer, device, epoch, loss_scaler, log_writer=log_writer, args=args,
            pruner=pruner, amp_dtype=amp_dtype, start_step=start_step, carried=carried,
            stop_requested=lambda: stop["stop"], input_stats=input_stats,
        )
        if train_stats["interrupted_at_step"] is not None:
            save_partial_epoch(args, epoch, train_stats, time.time() - epoch_start, model_without_ddp,
                               optimizer, loss_scaler, pruner)
            print(f"stopped by signal in epoch {epoch} after step {train_stats['interrupted_at_step']}; "
                  "checkpoint saved, resume with --auto_resume", force=True)
            return 143
        # the passes without gradient; a SIGTERM during them saves the state from before them (RNG
        # included, and no partial records), so the resume replays them whole
        stopped_in_pass, rng_before_passes = False, ckpt_util.rng_state()
        polled = dict(stop_requested=lambda: stop["stop"], print_freq=args.print_freq, input_stats=input_stats)
        embeddings = None
        if pruner.needs_embeddings:  # consumes no RNG (eval transform, unmasked encoder)
            embed_set = IndexedDataset(train_split(args, eval_transform(args.data_set, args.input_size)))
            embed_loader = make_loader(embed_set, pruner.embedding_sampler(), args, args.batch_size, STREAM_EMBED)
            embeddings, _ = compute_embeddings(model, embed_loader, device, num_samples, amp_dtype, **polled)
            stopped_in_pass = embeddings is None
        if pruner.forward_only_indices.size and not stopped_in_pass:
            seen = forward_only_pass(model_without_ddp, forward_loader, device, epoch, pruner, args.mask_ratio,
                                     amp_dtype, **polled)
            stopped_in_pass = seen is None
        if stopped_in_pass:
            ckpt_util.set_rng_state(rng_before_passes)
            train_stats["interrupted_at_step"] = start_step + len(train_loader)  # every training step done
            save_partial_epoch(args, epoch, train_stats, time.time() - epoch_start, model_without_ddp,
                               optimizer, loss_scaler, pruner)
            print(f"stopped by signal in epoch {epoch} after training, during its forward-only/embedding pass; "
                  "checkpoint saved, resume with --auto_resume", force=True)
            return 143
        pruning_log = pruner.end_epoch(epoch, embeddings, optimizer_steps=train_stats["optimizer_steps"],
                                       data_seconds=train_stats["data_seconds"], started=epoch_start)
        strategy = pruner.strategy
        subset = getattr(strategy, "subset", None)  # static methods: the fixed coreset, once selected
        if subset is not None and is_main_process() and epoch == strategy.warmup_epochs - 1:
            np.save(os.path.join(args.output_dir, "kept_static.npy"), subset)

        stop_now = any_rank(stop["stop"])  # every rank must take the same branch (collectives below)
        save = (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs or stop_now
        log_stats = {
            "epoch": epoch,
            "train_loss": train_stats["train_loss"],
            "lr": train_stats["lr"],
            "grad_norm": train_stats["grad_norm"],
            **pruning_log,
            "corrupt_replaced": train_stats["corrupt_replaced"],
        }
        if save:
            log_stats["replica_checksums"] = check_replicas(model_without_ddp, epoch)
        # log first, checkpoint second: a crash in between replays this epoch, and the resume
        # drops this line before writing it again (rewrite_log_until)
        if is_main_process():
            with open(log_path, "a") as f:
                f.write(json.dumps(log_stats) + "\n")
            write_tensorboard(log_writer, epoch, log_stats, strategy)
        if hasattr(strategy, "last_decision"):
            strategy.last_decision = None  # CLD + density: ~13 bytes per sample, not needed after logging
        if save:
            state = training_state(args, epoch, model_without_ddp, optimizer, loss_scaler, pruner)
            ckpt_util.save_on_master(state, ckpt_util.checkpoint_path(args.output_dir, epoch))
            ckpt_util.remove_superseded_partials(args.output_dir, epoch)
            if args.keep_last:
                saved = [e for e in range(epoch + 1) if (e + 1) % args.save_every == 0 or e == epoch]
                ckpt_util.prune_old_checkpoints(args.output_dir, keep=set(saved[-args.keep_last:]))
            barrier()
        if stop_now:
            print(f"stopped by signal after epoch {epoch}; resume with --auto_resume", force=True)
            return 143

    total_time = time.time() - run_start
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    if is_main_process():
        write_summary(args, pruner)
        if log_writer is not None:
            log_writer.close()
    barrier()
    return 0


def training_state(args, epoch, model, optimizer, loss_scaler, pruner) -> dict:
    """Everything an exact resume needs, as plain data (weights_only=True loads it)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": loss_scaler.state_dict(),
        "epoch": epoch,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "rng_states": ckpt_util.gather_rng_states(),
        "world_size": get_world_size(),
        "pruning": pruner.state_dict(),
    }


def check_replicas(model, epoch: int) -> list[str]:
    """All ranks' weight hashes; stop rather than save diverged replicas."""
    checksums = ckpt_util.replica_checksums(model)  # collective: all ranks
    if len(set(checksums)) != 1:
        raise RankDivergenceError(
            f"epoch {epoch}: model replicas differ across ranks ({checksums}); not saving a checkpoint of "
            "diverged weights. Fix: restart from the last checkpoint with --auto_resume"
        )
    return checksums


def save_partial_epoch(args, epoch, train_stats, seconds, model, optimizer, loss_scaler, pruner):
    """Preemption checkpoint: the state after `interrupted_at_step` steps of `epoch`, with the
    losses recorded so far (reduced over ranks) so the resumed epoch ends with the same totals."""
    step = int(train_stats["interrupted_at_step"])
    state = training_state(args, epoch - 1, model, optimizer, loss_scaler, pruner)
    partial = {"epoch": epoch, "step": step, "seconds": float(seconds),
               "loss_total": float(train_stats["loss_total"]), "loss_steps": int(train_stats["loss_steps"]),
               "optimizer_steps": int(train_stats["optimizer_steps"])}
    losses = pruner.epoch_losses()
    if losses is not None:
        partial["loss_sum"] = torch.from_numpy(losses.loss_sum)
        partial["count"] = torch.from_numpy(losses.count)
    state["partial_epoch"] = partial
    ckpt_util.save_on_master(state, ckpt_util.checkpoint_path(args.output_dir, epoch, step=step))
    barrier()


def resume_partial_epoch(partial, pruner, args) -> tuple[int, dict]:
    """Skip the batches trained before the preemption; rank 0 carries the losses recorded then."""
    step = int(partial["step"])
    pruner.sampler.skip(step * args.batch_size)
    if "loss_sum" in partial and is_main_process():
        pruner.carry_over(partial["loss_sum"].numpy(), partial["count"].numpy())
    print(f"resuming epoch {partial['epoch']} after step {step}")
    return step, partial


def load_training_state(checkpoint, path, args, model, optimizer, loss_scaler, pruner) -> None:
    """Restore model, optimizer, scaler, pruning state and RNG; refuse a checkpoint of another run."""
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as exc:
        saved = checkpoint.get("args", {}).get("model", "?")
        raise ckpt_util.ResumeMismatchError(
            f"checkpoint {path} holds a different model ({saved}) than --model {args.model}: {str(exc)[:300]}. "
            "Fix: resume with the same --model/--input_size, or use a new --output_dir"
        ) from exc
    optimizer.load_state_dict(checkpoint["optimizer"])
    loss_scaler.load_state_dict(checkpoint.get("scaler", {}))
    if "pruning" not in checkpoint:
        raise ckpt_util.ResumeMismatchError(
            f"checkpoint {path} has no pruning state: it is not a pre-training checkpoint of this script. "
            "Fix: pass a checkpoint written by main_pretrain_d3p.py, or start without --resume"
        )
    pruner.load_state_dict(checkpoint["pruning"])
    args.start_epoch = int(checkpoint["epoch"]) + 1
    if "partial_epoch" in checkpoint:
        args.start_epoch = int(checkpoint["partial_epoch"]["epoch"])
    ckpt_util.restore_rng_states(checkpoint["rng_states"])
    print(f"resumed from {path} (epoch {checkpoint['epoch']}), continuing at epoch {args.start_epoch}")


def write_tensorboard(writer, epoch: int, log_stats: dict, strategy) -> None:
    if writer is None:
        return
    for key, value in log_stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "plan_fingerprint"):
            writer.add_scalar(f"epoch/{key}", value, epoch)
    decision = getattr(strategy, "last_decision", None)
    if decision is not None:
        from d3p.plot import decision_figure

        writer.add_histogram("d3p/cld", decision.cld, epoch)
        writer.add_figure("d3p/decision", decision_figure(decision), epoch)
    writer.flush()


def write_summary(args, pruner) -> None:
    """OUTPUT_DIR/summary.json: the run's cost ledger and the flags that define the method."""
    summary = {"mode": "pretrain", "model": args.model, "data_set": args.data_set, **pruner.summary()}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("summary: " + json.dumps(summary))


def cli(argv: list[str] | None = None) -> int:
    d3p.import_prune_plugins(argv)  # a --prune_plugin's method and options must be flags before parsing
    parser = get_args_parser()
    args = parser.parse_args(argv)
    fill_defaults(args)
    validate_args(parser, args)
    try:
        return main(args)
    except (DatasetError, NonFiniteLossError, RankDivergenceError, ValueError) as exc:
        # not print(): ranks other than 0 are silenced there, and every rank's reason must show
        sys.stderr.write(f"error (rank {get_rank()}): {exc}\n")
        sys.stderr.flush()
        return 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(cli())
