"""How an entry script runs and ends: one exit code per kind of failure, `run_main` that maps errors to them, and
the last act of a run stopped by a signal.

The rest of the run layer is split by concern: util/flags.py (the shared flags), util/stop.py (stop signals),
util/resume.py (checkpoints and resume), util/loader.py (loaders), util/run_log.py (log files), and
util/lifecycle.py (the epoch sequence every training script shares).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from d3p.checkpoints import CheckpointFormatError
from d3p.collectives import get_rank, get_world_size
from d3p.distributed import RankDivergenceError
from util import checkpoint as ckpt_util
from util.dist import cleanup
from util.engine import NonFiniteLossError

# ------------------------------------------------------------------------------------------ exit codes
EXIT_FAILED = 1    # the training failed (NaN loss, diverged replicas): the last checkpoint is intact
EXIT_USAGE = 2     # bad flags or input (argparse's code too): nothing was trained
EXIT_STOPPED = 143  # stopped by a signal after saving (128 + SIGTERM, what a scheduler expects)


class ConfigError(RuntimeError):
    """A problem with the flags or inputs; the message names it and the fix (exit code 2)."""


def _usage_errors() -> tuple[type[BaseException], ...]:
    from util.data_errors import DatasetError

    return (ConfigError, DatasetError, ckpt_util.ResumeMismatchError, CheckpointFormatError, FileNotFoundError)


def run_main(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run an entry script's `main(args)` -> its exit code: EXIT_USAGE for bad input (ConfigError,
    DatasetError, a checkpoint of another run), EXIT_FAILED for a failed run (NonFiniteLossError,
    RankDivergenceError), else what main returned (an int, e.g. EXIT_STOPPED) or 0. The error line is
    written by every rank (not print(): ranks other than 0 are silenced there), without a traceback."""
    try:
        code = main(args)
        return code if isinstance(code, int) else 0
    except _usage_errors() as exc:
        _report(exc)
        return EXIT_USAGE
    except (NonFiniteLossError, RankDivergenceError, ValueError) as exc:  # ValueError: a check deeper down
        _report(exc)
        return EXIT_FAILED
    finally:
        cleanup()


def _report(exc: BaseException) -> None:
    sys.stderr.write(f"error (rank {get_rank()}): {exc}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------- common flags
def effective_batch_size(args: argparse.Namespace) -> int:
    """Samples per optimizer step over all ranks: --batch_size x --accum_iter x world size. MAE scales the
    learning rate by it (lr = blr x effective batch / 256)."""
    return args.batch_size * args.accum_iter * get_world_size()


def add_run_args(parser: argparse.ArgumentParser, save_every: int, keep_last: int) -> None:
    """The flags every training script spells the same way: output, checkpoints, resume, loader, devices.

    MAE's spellings stay as aliases: --save_ckpt_freq for --save_every, --no_pin_mem for --no-pin_mem."""
    g = parser.add_argument_group("output, checkpoints and resume")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, summary.json")
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
                   help="steps between host syncs (logging and the NaN check; a stop signal does not wait for them)")

    g = parser.add_argument_group("loader and devices")
    g.add_argument("--num_workers", default=None, type=int,
                   help="loader workers per process (default: this process's CPUs / processes per node, <= 16)")
    g.add_argument("--pin_mem", default=True, action=argparse.BooleanOptionalAction,
                   help="pin host memory of CUDA batches (--no-pin_mem or MAE's --no_pin_mem turns it off)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help=argparse.SUPPRESS)
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--world_size", default=1, type=int, help="number of processes (set by torchrun)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", default=-1, type=int,
                   help="set by the launcher (either spelling); the LOCAL_RANK variable is used")
    g.add_argument("--dist_url", default="env://", help="env:// only (torchrun or SLURM variables)")
    g.add_argument("--dist_timeout_min", default=30, type=int, help="collective timeout in minutes")


def run_arg_problems(args: argparse.Namespace) -> list[str]:
    """The common flags' problems, each naming the flag."""
    problems = []
    for name in ("save_every", "print_freq"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.keep_last < 0:
        problems.append(f"--keep_last must be >= 0, got {args.keep_last}")
    if args.num_workers is not None and args.num_workers < 0:
        problems.append(f"--num_workers must be >= 0, got {args.num_workers}")
    return problems


def stopped(stop, message: str) -> int:
    """The last act of a run stopped by a signal after its checkpoint: one clear line, the previous
    handler (submitit's requeue), EXIT_STOPPED."""
    print(f"{message}; checkpoint saved, resume with --auto_resume", force=True)
    stop.hand_over()
    return EXIT_STOPPED
