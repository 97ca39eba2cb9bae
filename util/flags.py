"""The flags the entry scripts share, each declared once here, and their checks.

Groups: training (batch, epochs, accumulation, clipping, precision, compile), optimizer (the parts pre-training and
fine-tuning spell alike; the defaults are the script's), data (where the images come from), and run (output,
checkpoints, resume, loader, devices). The names are MAE's; where a default differs between scripts it is a
parameter, so each script keeps its own (pre-training --epochs 400, fine-tuning's recipe-dependent None).

A bad combination is refused one way in every script: the checks below return problems, each naming the flag and
the fix, and `raise_problems` turns them into one `util.run.ConfigError` (exit code 2 through `run.run_main`, the
message without a traceback).
"""
from __future__ import annotations

import argparse
import os

from d3p.collectives import get_world_size
from util.amp import autocast_dtype
from util.dist import resolve_device
from util.run import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PRECISION_HELP = "autocast dtype: auto = bf16 on GPUs with native bf16 (sm80+), else fp16; fp32 on CPU"


# ---------------------------------------------------------------------------------------------- training
def add_batch_size_arg(group, default: int = 64,
                       help: str = "batch size per GPU/process (effective: batch_size * accum_iter * GPUs)") -> None:
    group.add_argument("--batch_size", default=default, type=int, help=help)


def add_precision_arg(group, help: str = PRECISION_HELP) -> None:
    group.add_argument("--precision", default="auto", choices=list(PRECISIONS), help=help)


def add_training_args(parser: argparse.ArgumentParser, epochs: int | None, epochs_help: str = "training epochs"):
    """--batch_size, --epochs, --accum_iter, --clip_grad, --precision, --compile -> the group (a script adds its
    own training flags to it)."""
    g = parser.add_argument_group("training")
    add_batch_size_arg(g)
    g.add_argument("--epochs", default=epochs, type=int, help=epochs_help)
    g.add_argument("--accum_iter", default=1, type=int,
                   help="accumulate gradients over this many iterations (raises the effective batch size)")
    g.add_argument("--clip_grad", type=float, default=None, metavar="NORM",
                   help="clip the gradient norm (default: off, as MAE)")
    add_precision_arg(g)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (in place, before DDP; checkpoint keys unchanged). Off by default")
    g.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)  # tests: "eager"
    g.add_argument("--drop_last", action="store_true",
                   help="MAE's batching: full batches of --batch_size, each epoch's remainder dropped (parity "
                        "checks, the published RS2 loop). Default: balanced batches, every kept sample trained "
                        f"once, no runt. Only with --prune_method {', '.join(DROP_LAST_METHODS)}")
    return g


# methods that do not score samples by their losses: a sample the loader drops loses nothing they decide by
DROP_LAST_METHODS = ("none", "random", "rs2", "random_static")


def effective_batch_size(args: argparse.Namespace) -> int:
    """Samples per optimizer step over all ranks: --batch_size x --accum_iter x world size. MAE scales the
    learning rate by it (lr = blr x effective batch / 256)."""
    return args.batch_size * args.accum_iter * get_world_size()


def training_arg_problems(args: argparse.Namespace) -> list[str]:
    """Problems of the training group's flags, each naming the flag."""
    problems = [f"--{name} must be >= 1, got {getattr(args, name)}"
                for name in ("batch_size", "epochs", "accum_iter") if getattr(args, name) < 1]
    if args.clip_grad is not None and args.clip_grad <= 0:
        problems.append(f"--clip_grad must be > 0, got {args.clip_grad}. Fix: leave it out to disable clipping")
    method = getattr(args, "prune_method", "none")
    if getattr(args, "drop_last", False) and method not in DROP_LAST_METHODS:
        problems.append(f"--drop_last drops samples that --prune_method {method} scores by their loss: a dropped "
                        "sample would get no loss and be pruned for it. Fix: leave --drop_last out (balanced "
                        f"batches train every kept sample), or use --prune_method {'/'.join(DROP_LAST_METHODS)}")
    try:
        autocast_dtype(args.precision, resolve_device(args.device))
    except ValueError as exc:  # e.g. fp16 on a CPU: the message names the flag and the fix
        problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------------------------- optimizer
def add_optimizer_args(parser: argparse.ArgumentParser, title: str, *, weight_decay: float | None, blr: float | None,
                       min_lr: float | None, warmup_epochs: float | None, warmup_type: type = int,
                       default_notes: dict[str, str] | None = None):
    """--weight_decay, --lr, --blr, --min_lr, --warmup_epochs with the script's defaults -> the group.
    `default_notes` adds a flag's default wording to its help where the default is decided later (None)."""
    notes = default_notes or {}
    g = parser.add_argument_group(title)
    g.add_argument("--weight_decay", type=float, default=weight_decay, help="weight decay" + notes.get("weight_decay", ""))
    g.add_argument("--lr", type=float, default=None, metavar="LR",
                   help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", type=float, default=blr, metavar="LR",
                   help="base lr per 256 samples: absolute_lr = blr * effective batch / 256" + notes.get("blr", ""))
    g.add_argument("--min_lr", type=float, default=min_lr, metavar="LR",
                   help="lower lr bound of the cosine schedule" + notes.get("min_lr", ""))
    g.add_argument("--warmup_epochs", type=warmup_type, default=warmup_epochs, metavar="N",
                   help="epochs of linear lr warm-up" + notes.get("warmup_epochs", ""))
    return g


def optimizer_arg_problems(args: argparse.Namespace) -> list[str]:
    """Problems of the optimizer group's flags (after the script filled its defaults), each naming the flag."""
    checks = [
        (args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}"),
        (args.lr is None or args.lr > 0, f"--lr must be > 0, got {args.lr} (leave it out to scale --blr)"),
        (args.blr > 0, f"--blr must be > 0, got {args.blr}"),
        (args.min_lr >= 0, f"--min_lr must be >= 0, got {args.min_lr}"),
        (args.warmup_epochs >= 0, f"--warmup_epochs must be >= 0, got {args.warmup_epochs}"),
    ]
    return [message for ok, message in checks if not ok]


# -------------------------------------------------------------------------------------------------- data
def add_data_source_args(group, data_path_help: str = "dataset root; leave out for the embedded digits") -> None:
    """--data_path and --data_set: where the images come from."""
    from util.datasets import DATA_SETS

    group.add_argument("--data_path", default=None, type=str, help=data_path_help)
    group.add_argument("--data_set", default=None, choices=list(DATA_SETS),
                       help="default: imagenet (ImageFolder train/ val/) with --data_path, digits without")


def add_data_args(parser: argparse.ArgumentParser, title: str = "data", jpeg_help: str = ""):
    """--data_path, --data_set, --download, --jpeg_upsampling -> the group (a script adds its own data flags)."""
    from util.image_transforms import JPEG_UPSAMPLING

    g = parser.add_argument_group(title)
    add_data_source_args(g)
    g.add_argument("--download", action="store_true", help="cifar10/cifar100: let torchvision download into --data_path")
    g.add_argument("--jpeg_upsampling", default="fast", choices=list(JPEG_UPSAMPLING),
                   help="chroma upsampling when decoding training crops from JPEG folders: fast = libjpeg's merged "
                        "upsampler (~4%% more images/s per loader core, 0.4 levels mean difference, no shift of "
                        "channel means), fancy = libjpeg's default, pixels as PIL decodes them" + jpeg_help)
    return g


def data_arg_problems(args: argparse.Namespace) -> list[str]:
    if args.data_path and not os.path.isdir(args.data_path):
        return [f"--data_path {args.data_path} does not exist. Fix: pass the dataset root, or leave it out to use the "
                "embedded digits"]
    return []


# --------------------------------------------------------------------------------------------------- run
def add_output_dir_arg(group, default: str = "./output_dir", help: str = "checkpoints, log.txt, summary.json") -> None:
    group.add_argument("--output_dir", default=default, help=help)


def add_loader_args(group, mae_pin_mem_alias: bool = True) -> None:
    """--num_workers, --pin_mem (and MAE's --no_pin_mem spelling when `mae_pin_mem_alias`)."""
    group.add_argument("--num_workers", default=None, type=int,
                       help="loader workers per process (default: this process's CPUs / processes per node, <= 16)")
    off = "--no-pin_mem or MAE's --no_pin_mem" if mae_pin_mem_alias else "--no-pin_mem"
    group.add_argument("--pin_mem", default=True, action=argparse.BooleanOptionalAction,
                       help=f"pin host memory of CUDA batches ({off} turns it off)")
    if mae_pin_mem_alias:
        group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help=argparse.SUPPRESS)


def add_device_args(group) -> None:
    """--device and the launcher's flags (--world_size, --local_rank, --dist_url, --dist_timeout_min)."""
    group.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    group.add_argument("--world_size", default=1, type=int, help="number of processes (set by torchrun)")
    group.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                       help="set by the launcher (either spelling); the LOCAL_RANK variable is used")
    group.add_argument("--dist_url", default="env://", help="env:// only (torchrun or SLURM variables)")
    group.add_argument("--dist_timeout_min", default=30, type=int, help="collective timeout in minutes")


def add_run_args(parser: argparse.ArgumentParser, save_every: int, keep_last: int) -> None:
    """The flags every training script spells the same way: output, checkpoints, resume, loader, devices.

    MAE's spellings stay as aliases: --save_ckpt_freq for --save_every, --no_pin_mem for --no-pin_mem."""
    g = parser.add_argument_group("output, checkpoints and resume")
    add_output_dir_arg(g)
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    g.add_argument("--save_every", "--save_ckpt_freq", dest="save_every", default=save_every, type=int,
                   help=f"checkpoint every N epochs, plus the last (default {save_every}); a stop signal "
                        "saves a mid-epoch checkpoint whatever N is")
    g.add_argument("--keep_last", default=keep_last, type=int,
                   help=f"keep only the newest K epoch checkpoints (0: keep all; default {keep_last})")
    g.add_argument("--resume", default="", help="checkpoint to resume from")
    g.add_argument("--auto_resume", action="store_true",
                   help="resume from the newest complete checkpoint in --output_dir (mid-epoch ones included)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch (0-based)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--print_freq", default=20, type=int,
                   help="steps between host syncs (logging, the NaN check, and reacting to a stop signal)")

    g = parser.add_argument_group("loader and devices")
    add_loader_args(g)
    add_device_args(g)


def run_arg_problems(args: argparse.Namespace) -> list[str]:
    """The run group's problems, each naming the flag and the fix."""
    problems = [f"--{name} must be >= 1, got {getattr(args, name)}"
                for name in ("save_every", "print_freq") if getattr(args, name) < 1]
    if args.keep_last < 0:
        problems.append(f"--keep_last must be >= 0, got {args.keep_last} (0 keeps every checkpoint)")
    if args.start_epoch < 0:
        problems.append(f"--start_epoch must be >= 0, got {args.start_epoch}")
    if args.num_workers is not None and args.num_workers < 0:
        problems.append(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.resume and args.auto_resume:
        problems.append("--resume and --auto_resume are exclusive. Fix: pick one")
    if args.resume and not os.path.isfile(args.resume):
        problems.append(f"--resume checkpoint {args.resume} does not exist. Fix: check the path, or use --auto_resume")
    return problems


# ------------------------------------------------------------------------------------------------ refusal
def shared_arg_problems(args: argparse.Namespace) -> list[str]:
    """The training, optimizer, data and run groups' problems of a training script, in that order."""
    return training_arg_problems(args) + optimizer_arg_problems(args) + data_arg_problems(args) + run_arg_problems(args)


def raise_problems(problems: list[str]) -> None:
    """Refuse the flags when there is any problem: one ConfigError naming them all (exit code 2 via run_main)."""
    if problems:
        raise ConfigError("; ".join(problems))
