"""A run's checkpoints, written and read in one place: the epoch checkpoint, the mid-epoch one a stop writes,
and the resume from either (exact: weights, optimizer, scaler, pruning state, every rank's RNG and the interrupted
epoch's statistics). Key names are MAE's (model, optimizer, scaler, epoch, args), so MAE's weights load."""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import torch

from d3p.collectives import all_gather_object, get_rank, get_world_size
from util import checkpoint as ckpt_util
from util.dist import barrier, is_main_process
from util.engine import EpochMeters
from util.run_folder import LOG_FILE
from util.run_log import rewrite_log_until


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


def is_save_epoch(args, epoch: int) -> bool:
    return (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs


def save_epoch_checkpoint(args, epoch: int, state: dict) -> None:
    """checkpoint-E.pth (rank 0, atomic), then drop superseded mid-epoch checkpoints and, with --keep_last
    K, all but the newest K epoch checkpoints. Every rank returns after the file is complete."""
    ckpt_util.save_on_master(state, ckpt_util.checkpoint_path(args.output_dir, epoch))
    ckpt_util.remove_superseded_partials(args.output_dir, epoch)
    if args.keep_last:
        saved = [e for e in range(epoch + 1) if (e + 1) % args.save_every == 0 or e == epoch]
        ckpt_util.prune_old_checkpoints(args.output_dir, keep=set(saved[-args.keep_last:]))
    barrier()


def save_partial_epoch(args, epoch: int, state: dict, step: int, samples_done: int, seconds: float,
                       meters: EpochMeters, pruner) -> str:
    """Preemption checkpoint checkpoint-E-stepK.pth: `state` (run_state of epoch E - 1's numbering) after `step`
    steps of `epoch`, `samples_done` positions of the epoch's global order trained (the sampler's `samples_done`:
    resumable on another world or batch size), the `seconds` spent on the epoch so far, every rank's meters (a
    collective), and the losses recorded so far, reduced over ranks (a collective). Returns the path."""
    partial = {"epoch": epoch, "step": int(step), "samples_done": int(samples_done), "seconds": float(seconds),
               "batch_size": int(args.batch_size), "rank_meters": all_gather_object(meters.state_dict())}
    losses = pruner.epoch_losses()
    if losses is not None:
        partial["loss_sum"] = torch.from_numpy(losses.loss_sum)
        partial["count"] = torch.from_numpy(losses.count)
    state["partial_epoch"] = partial
    path = ckpt_util.checkpoint_path(args.output_dir, epoch, step=step)
    ckpt_util.save_on_master(state, path)
    barrier()
    return path


@dataclasses.dataclass
class ResumePoint:
    """Where a resumed run continues: the epoch, the interrupted epoch's record (a mid-epoch checkpoint), and the
    log line of an epoch whose evaluation a stop interrupted (it is evaluated and logged first)."""
    path: str
    start_epoch: int
    partial: dict | None = None
    written_by: dict | None = None  # the checkpoint's world_size and args
    pending_log: dict | None = None


def resume_partial_epoch(point: ResumePoint, pruner) -> tuple[int, EpochMeters]:
    """Continue the epoch a stop interrupted -> (steps done, this rank's meters of the interrupted part).

    The training sampler skips the samples_done positions of the epoch's global order, on this run's world size
    and batch size (which may differ from the interrupted run's: the rest is then split anew, every kept sample is
    still trained once this epoch, and rank 0 carries the meters of all ranks). Rank 0 carries the losses
    recorded before."""
    partial = point.partial
    samples_done = _samples_done(partial, point.written_by or {})
    pruner.sampler.resume_epoch(samples_done)
    if "loss_sum" in partial and is_main_process():
        pruner.carry_over(partial["loss_sum"].numpy(), partial["count"].numpy())
    before = int((point.written_by or {}).get("world_size") or get_world_size())
    per_rank = partial.get("rank_meters") or []
    meters = EpochMeters()
    if len(per_rank) == get_world_size():
        meters.load_state_dict(per_rank[get_rank()])
    elif per_rank and is_main_process():
        meters = EpochMeters.merged(per_rank)
    resized = "" if before == get_world_size() else (
        f"; the checkpoint was written by {before} rank(s), this run has {get_world_size()}: the epoch's "
        "remaining samples are split anew (each kept sample is still trained once)")
    print(f"resuming epoch {partial['epoch']} after step {partial['step']} ({samples_done} of "
          f"{pruner.sampler.kept.size} samples of the epoch trained){resized}")
    return int(partial["step"]), meters


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
    for all ranks), else --resume's file; None when there is none. MAE's own checkpoints (args as a Namespace)
    load too (d3p.checkpoints.load_plain)."""
    if getattr(args, "auto_resume", False):
        found = ckpt_util.find_resume_checkpoint(args.output_dir)
        if found is not None or not args.resume:
            return found
    if args.resume:
        return args.resume, ckpt_util.load_checkpoint(args.resume)
    return None


def load_weights(model, checkpoint: dict, path: str, fix: str) -> None:
    """The checkpoint's `model` state into `model` (strictly); another model is refused with the fix named."""
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except (RuntimeError, KeyError) as exc:
        saved = (checkpoint.get("args") or {}).get("model", "?") if isinstance(checkpoint.get("args"), dict) else "?"
        raise ckpt_util.ResumeMismatchError(
            f"checkpoint {path} holds a different model ({saved}) than this run's: {str(exc)[:300]}. Fix: {fix}, "
            "or use a new --output_dir") from exc


def restore_run_state(checkpoint: dict, path: str, r, prune_method: str) -> ResumePoint:
    """Load optimizer, scaler, pruning state and RNG of every rank from `checkpoint` (its weights are loaded
    already) -> where to continue (the interrupted epoch for a mid-epoch checkpoint). A checkpoint of another
    run is refused with the fix named (ResumeMismatchError)."""
    r.optimizer.load_state_dict(checkpoint["optimizer"])
    r.loss_scaler.load_state_dict(checkpoint.get("scaler") or {})
    if "pruning" in checkpoint:
        try:
            r.pruner.load_state_dict(checkpoint["pruning"])
        except ValueError as exc:
            raise ckpt_util.ResumeMismatchError(str(exc)) from exc
    elif prune_method != "none":
        raise ckpt_util.ResumeMismatchError(
            f"checkpoint {path} has no pruning state (written without pruning, or by MAE), so --prune_method "
            f"{prune_method} cannot continue it exactly. Fix: resume with --prune_method none, or start a new "
            "--output_dir")
    if "rng_states" in checkpoint:
        ckpt_util.restore_rng_states(checkpoint["rng_states"])
    partial = checkpoint.get("partial_epoch")
    start = int(partial["epoch"]) if partial is not None else int(checkpoint["epoch"]) + 1
    print(f"resumed from {path} (epoch {checkpoint['epoch']}), continuing at epoch {start}, with optimizer and scaler")
    if is_main_process():
        rewrite_log_until(os.path.join(r.args.output_dir, LOG_FILE), start - 1)
    return ResumePoint(path, start, partial, {k: checkpoint.get(k) for k in ("world_size", "args")},
                       checkpoint.get("pending_log"))
