"""The run layer every entry script shares: stop signals, loaders, the run's checkpoints (one writer, one
reader, mid-epoch ones included), its log files, and one exit code per kind of failure. (The shared flags and
their checks are in util/flags.py.)

An entry script keeps only its recipe (model, optimizer, epoch loop); everything here is the same for
pre-training, fine-tuning, the linear probe and k-NN.
"""
from __future__ import annotations

import argparse
import atexit
import glob
import json
import os
import signal
import sys
import weakref
from typing import Any, Callable, Sequence

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


# ---------------------------------------------------------------------------------------- stop signals
def stop_signals() -> tuple[signal.Signals, ...]:
    """What asks a run to stop: SIGTERM (SLURM at a time limit, scancel or preemption; torchrun's agent
    when it is stopped), SIGINT (Ctrl-C), SIGUSR1/SIGUSR2 (SLURM's early warning with --signal, which
    submitit sets to USR2)."""
    return tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class StopSignals:
    """A stop request from the scheduler, as a flag the training loop polls at its sync points.

    The handler only sets the flag (and prints a line once); the engine finishes the current optimizer
    step, the ranks agree at the next sync point, save a mid-epoch checkpoint and exit with EXIT_STOPPED.
    A handler that was installed before (submitit's requeue on SIGUSR2) is called by `hand_over` after the
    save, so the job is still requeued. A second SIGINT interrupts at once (KeyboardInterrupt).
    """

    def __init__(self, signals: Sequence[signal.Signals] | None = None):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        for sig in signals or stop_signals():
            self._previous[int(sig)] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.signum = True, signum
            # os.write, not print: the handler may interrupt a print of the main thread (a reentrant call
            # into the same buffered stream raises)
            os.write(2, f"rank {get_rank()}: received signal {signal.Signals(signum).name}: will finish this "
                        "optimizer step, save a checkpoint at the next sync point (--print_freq) and exit\n".encode())

    def __call__(self) -> bool:
        return self.requested

    def hand_over(self) -> None:
        """After the save: give the signal to the handler that was there before (a Python function such as
        submitit's checkpoint-and-requeue), if any."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous):
            previous(self.signum, None)

    def restore(self) -> None:
        """Put the previous handlers back (the run is over)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def ignore_stop_signals_in_worker(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """worker_init_fn: a DataLoader worker ignores the stop signals.

    Why: schedulers signal the whole process group (torchrun's agent killpg()s each rank, SLURM signals
    every process of the step), so the workers get the SIGTERM too; torch's worker handler then kills the
    worker (the sender is not its parent) and the training process raises "DataLoader worker (pid N) is
    killed by signal: Terminated" before it can save. Ignored, the workers go on feeding the loop until the
    training process has saved; they still exit when it shuts the loader down or dies (torch's watchdog)."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def worker_init(then: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """ignore_stop_signals_in_worker composed with an optional `then(worker_id)` (picklable)."""
    import functools

    return functools.partial(ignore_stop_signals_in_worker, then=then)


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
