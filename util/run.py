"""The run layer every entry script shares: common flags, loaders, the run's checkpoints (one writer, one
reader, mid-epoch ones included), its log files, and one exit code per kind of failure. Stop signals and the
ranks' agreement to stop: util/stop.py.

An entry script keeps only its recipe (model, optimizer, epoch loop); everything here is the same for
pre-training, fine-tuning, the linear probe and k-NN.
"""
from __future__ import annotations

import argparse
import atexit
import glob
import json
import os
import sys
import weakref
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from d3p.checkpoints import CheckpointFormatError
from d3p.collectives import get_rank, get_world_size
from d3p.distributed import RankDivergenceError
from util import checkpoint as ckpt_util
from util.dist import barrier, cleanup, is_main_process
from util.item_seeding import ItemSeedSampler, SeededItems
from util.loader import collate_indexed
from util.engine import NonFiniteLossError
# the stop-signal layer lives in util.stop; imported back for the callers of run.StopSignals (the entry scripts)
# and for make_loader's worker_init
from util.stop import StopSignals, ignore_stop_signals_in_worker, stop_signals, worker_init  # noqa: F401

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
                   help="steps between host syncs (logging, the NaN check, and reacting to a stop signal)")

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


# ----------------------------------------------------------------------------------------------- loaders
_LOADERS: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()  # the loaders whose workers ignore stop signals


def _release_workers() -> None:
    """At interpreter exit, before torch's and multiprocessing's exit hooks (atexit runs the newest first):
    drop the persistent iterators of our loaders, whose __del__ then stops their workers in order.

    Why: at exit torch skips its orderly worker shutdown and multiprocessing ends daemonic workers with
    terminate() (SIGTERM), which these workers ignore; its join would then wait forever."""
    for loader in list(_LOADERS):
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator = None


atexit.register(_release_workers)


def _tracked(loader: DataLoader) -> DataLoader:
    if loader.num_workers > 0:
        _LOADERS.add(loader)
    return loader


def make_loader(dataset: Dataset, sampler: Sampler, args: argparse.Namespace, batch_size: int, stream: int,
                drop_last: bool = False) -> DataLoader:
    """A training-side loader: items come with their dataset index, and their augmentation is a function of
    (seed, stream, epoch, rank, position) in worker processes (util.item_seeding.SeededItems), so a resume with
    workers replays it exactly. Workers ignore stop signals (ignore_stop_signals_in_worker)."""
    return _tracked(DataLoader(
        SeededItems(dataset), sampler=ItemSeedSampler(sampler, args.seed, get_rank(), stream),
        batch_size=batch_size, drop_last=drop_last, collate_fn=collate_indexed, generator=torch.Generator(),
        **_worker_options(args),  # creating an iterator never draws from the global RNG (own generator)
    ))


def make_eval_loader(dataset: Dataset, sampler: Sampler, args: argparse.Namespace, batch_size: int,
                     collate_fn: Callable | None = None) -> DataLoader:
    """An evaluation loader (no augmentation to seed); its workers ignore stop signals too.

    Its own generator, as in make_loader: creating an iterator would otherwise draw a worker seed from the
    global torch RNG. With persistent workers that happens once per run, so a run resumed mid-training would
    draw it at another point than the uninterrupted run, and every drop-path mask after it would differ."""
    return _tracked(DataLoader(dataset, sampler=sampler, batch_size=batch_size, drop_last=False,
                               collate_fn=collate_fn, generator=torch.Generator(), **_worker_options(args)))


def _worker_options(args: argparse.Namespace) -> dict:
    workers = int(args.num_workers)
    return dict(num_workers=workers, pin_memory=bool(args.pin_mem) and str(args.device).startswith("cuda"),
                persistent_workers=workers > 0, worker_init_fn=worker_init() if workers > 0 else None)


# A short last batch: the engine trains every kept sample (no drop_last, unlike MAE: each kept sample must get
# its loss), so an epoch of K samples per rank ends in a batch of K % batch_size, stepped at the full learning rate.
# Among few steps that noisy step costs: on the digits at 70% pruned (450 = 7 x 64 + 2, one step in 8) random and
# RS2 lost 16-18 k-NN points against 448 kept (docs/does_pruning_pay.md). Among hundreds of steps it does not.
SHORT_BATCH_FRACTION = 8  # a last batch under batch_size / 8 samples is short
SHORT_BATCH_MAX_STEPS = 50  # ... when it is at least one step in 50


def short_last_batch(num_local: int, batch_size: int) -> str | None:
    """The warning for an epoch whose per-rank list of `num_local` samples ends in a short batch (fewer than
    batch_size / SHORT_BATCH_FRACTION samples, in an epoch of at most SHORT_BATCH_MAX_STEPS batches), else None."""
    rest, batches = num_local % batch_size, -(-num_local // batch_size)
    if rest == 0 or rest * SHORT_BATCH_FRACTION >= batch_size or batches > SHORT_BATCH_MAX_STEPS:
        return None
    return (f"{num_local} samples per rank end in a batch of {rest} of {batch_size} (1 batch of {batches}): a "
            f"gradient of {rest} sample(s) at the full learning rate, which costs accuracy when epochs are this "
            "short. Fix: a --batch_size or a prune ratio whose kept count per rank fills whole batches "
            "(docs/does_pruning_pay.md, the 70% column)")


def warn_short_last_batch(loader: DataLoader, epoch: int, warned: bool) -> bool:
    """Print short_last_batch's warning for the epoch `loader` is about to run (rank 0, the first epoch it applies
    to: `warned` says whether an earlier epoch printed it); returns the new `warned`. A loader that drops its last
    batch (the linear probe's) has none to warn of. Every rank's list has the same length."""
    if warned or loader.drop_last:
        return warned
    message = short_last_batch(len(loader.sampler), loader.batch_size)
    if message is None:
        return False
    if is_main_process():
        print(f"warning: epoch {epoch}: {message}. Said once per run.", flush=True)
    return True


# ------------------------------------------------------------------------------------------- checkpoints
def plain_args(args: argparse.Namespace) -> dict:
    """The flags as plain data (weights_only=True loads them)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def run_state(args, epoch: int, model, optimizer, loss_scaler, pruner, **extra: Any) -> dict:
    """Everything an exact resume needs, as plain data, in MAE's key names (model, optimizer, scaler, epoch,
    args) plus rng_states (every rank's; a collective), world_size and the pruning state."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": loss_scaler.state_dict(),
        "epoch": epoch,
        "args": plain_args(args),
        "rng_states": ckpt_util.gather_rng_states(),
        "world_size": get_world_size(),
        "pruning": pruner.state_dict(),
        **extra,
    }


def save_epoch_checkpoint(args, epoch: int, state: dict) -> None:
    """checkpoint-E.pth (rank 0, atomic), then drop superseded mid-epoch checkpoints and, with --keep_last
    K, all but the newest K epoch checkpoints. Every rank returns after the file is complete."""
    ckpt_util.save_on_master(state, ckpt_util.checkpoint_path(args.output_dir, epoch))
    ckpt_util.remove_superseded_partials(args.output_dir, epoch)
    if args.keep_last:
        saved = [e for e in range(epoch + 1) if (e + 1) % args.save_every == 0 or e == epoch]
        ckpt_util.prune_old_checkpoints(args.output_dir, keep=set(saved[-args.keep_last:]))
    barrier()


def is_save_epoch(args, epoch: int) -> bool:
    return (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs


def save_partial_epoch(args, epoch: int, state: dict, step: int, samples_done: int, seconds: float,
                       pruner, **carried: Any) -> str:
    """Preemption checkpoint checkpoint-E-stepK.pth: `state` (run_state of epoch E - 1's numbering) after
    `step` steps of `epoch`, `samples_done` positions of the epoch's global order trained (the sampler's
    `samples_done`: resumable on another world or batch size), and the losses recorded so far, reduced over
    ranks (a collective), so the resumed epoch ends with the same totals. Returns the path."""
    partial = {"epoch": epoch, "step": int(step), "samples_done": int(samples_done), "seconds": float(seconds),
               "batch_size": int(args.batch_size), **carried}
    losses = pruner.epoch_losses()
    if losses is not None:
        partial["loss_sum"] = torch.from_numpy(losses.loss_sum)
        partial["count"] = torch.from_numpy(losses.count)
    state["partial_epoch"] = partial
    path = ckpt_util.checkpoint_path(args.output_dir, epoch, step=step)
    ckpt_util.save_on_master(state, path)
    barrier()
    return path


def resume_partial_epoch(partial: dict, written_by: dict, pruner) -> tuple[int, dict]:
    """Continue the epoch a preemption interrupted -> (steps done, the carried statistics).

    The training sampler skips the samples_done positions of the epoch's global order, on this run's world
    size and batch size (which may differ from the interrupted run's: the rest is then split anew, and every
    kept sample is still trained once this epoch). Rank 0 carries the losses recorded before."""
    samples_done = _samples_done(partial, written_by)
    pruner.sampler.resume_epoch(samples_done)
    if "loss_sum" in partial and is_main_process():
        pruner.carry_over(partial["loss_sum"].numpy(), partial["count"].numpy())
    before = int(written_by.get("world_size") or get_world_size())
    resized = "" if before == get_world_size() else (
        f"; the checkpoint was written by {before} rank(s), this run has {get_world_size()}: the epoch's "
        "remaining samples are split anew (each kept sample is still trained once)")
    print(f"resuming epoch {partial['epoch']} after step {partial['step']} ({samples_done} of "
          f"{pruner.sampler.kept.size} samples of the epoch trained){resized}")
    return int(partial["step"]), partial


def _samples_done(partial: dict, written_by: dict) -> int:
    """The global positions trained; from step x batch size x world size for checkpoints written before
    samples_done was stored (`written_by`: the checkpoint's world_size and args)."""
    if "samples_done" in partial:
        return int(partial["samples_done"])
    saved_args = written_by.get("args") or {}
    world = int(written_by.get("world_size") or 1)
    return int(partial["step"]) * int(saved_args.get("batch_size", 0)) * world


def find_or_load(args) -> tuple[str, dict] | None:
    """The checkpoint to resume: with --auto_resume the newest complete one in --output_dir (rank 0 chooses
    for all ranks), else --resume's file; None when there is none."""
    if getattr(args, "auto_resume", False):
        return ckpt_util.find_resume_checkpoint(args.output_dir)
    if args.resume:
        return args.resume, ckpt_util.load_checkpoint(args.resume)
    return None


def restore_run_state(checkpoint: dict, path: str, model, optimizer, loss_scaler, pruner, model_hint: str) -> int:
    """Load model, optimizer, scaler, pruning state and RNG from `checkpoint` -> the epoch to continue at
    (the interrupted one for a mid-epoch checkpoint). A checkpoint of another model or run is refused
    with the fix named (ResumeMismatchError)."""
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, KeyError) as exc:
        saved = checkpoint.get("args", {}).get("model", "?")
        raise ckpt_util.ResumeMismatchError(
            f"checkpoint {path} holds a different model ({saved}) than this run's ({model_hint}): "
            f"{str(exc)[:300]}. Fix: resume with the same --model/--input_size/--nb_classes, or use a new "
            "--output_dir"
        ) from exc
    optimizer.load_state_dict(checkpoint["optimizer"])
    loss_scaler.load_state_dict(checkpoint.get("scaler") or {})
    try:
        pruner.load_state_dict(checkpoint["pruning"])
    except ValueError as exc:
        raise ckpt_util.ResumeMismatchError(str(exc)) from exc
    ckpt_util.restore_rng_states(checkpoint["rng_states"])
    start = int(checkpoint["epoch"]) + 1
    if "partial_epoch" in checkpoint:
        start = int(checkpoint["partial_epoch"]["epoch"])
    print(f"resumed from {path} (epoch {checkpoint['epoch']}), continuing at epoch {start}")
    return start


def stopped(stop: StopSignals, message: str) -> int:
    """The last act of a run stopped by a signal after its checkpoint: one clear line, the previous
    handler (submitit's requeue), EXIT_STOPPED."""
    print(f"{message}; checkpoint saved, resume with --auto_resume", force=True)
    stop.hand_over()
    return EXIT_STOPPED


# ------------------------------------------------------------------------------------------------- logs
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


def append_log(output_dir: str, stats: dict) -> None:
    """One JSON line per epoch in OUTPUT_DIR/log.txt (rank 0)."""
    if is_main_process():
        with open(os.path.join(output_dir, "log.txt"), "a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")


def write_summary(output_dir: str, summary: dict) -> None:
    """OUTPUT_DIR/summary.json (rank 0): the run's figures and its cost ledger."""
    if is_main_process():
        with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print("summary: " + json.dumps(summary, default=str))


def summary_writer(log_dir: str | None):
    """TensorBoard writer on rank 0 (None elsewhere, or without a folder)."""
    if not (log_dir and is_main_process()):
        return None
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def write_epoch_tensorboard(writer, epoch: int, stats: dict, strategy) -> None:
    """Every number of the epoch's log line as `epoch/<key>`, and after a D3P decision the CLD histogram and the
    decision figure (`d3p/cld`, `d3p/decision`), to rank 0's writer (None elsewhere: nothing is written). On every
    rank it then drops the strategy's decision (CLD + density: ~13 bytes per sample), which only logging needs."""
    decision = getattr(strategy, "last_decision", None)
    if writer is not None:
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "plan_fingerprint"):
                writer.add_scalar(f"epoch/{key}", value, epoch)
        if decision is not None:
            from d3p.plot import decision_figure

            writer.add_histogram("d3p/cld", decision.cld, epoch)
            writer.add_figure("d3p/decision", decision_figure(decision), epoch)
        writer.flush()
    if decision is not None:
        strategy.last_decision = None


def has_checkpoint(output_dir: str) -> bool:
    return bool(glob.glob(os.path.join(output_dir, "checkpoint-*.pth")))
