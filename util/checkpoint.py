"""Checkpoints: plain data (loads with weights_only=True), written atomically, found newest-complete-first."""
from __future__ import annotations

import glob
import os
import random
import re
import warnings
from typing import Any

import torch

from d3p.checkpoints import atomic_save, load_plain
from d3p.collectives import all_gather_object, get_rank, get_world_size
from util.dist import is_main_process
from util.run_folder import CHECKPOINT_GLOB, CHECKPOINT_RE, PARTIAL_CHECKPOINT_GLOB, checkpoint_name

class ResumeMismatchError(ValueError):
    """A checkpoint from another run (model, dataset size, method): resuming it would corrupt this one."""


# the one atomic save (d3p.checkpoints.atomic_save), under the name the scripts' savers call (and tests patch)
atomic_torch_save = atomic_save


def rng_state() -> dict:
    """This process's RNG states: torch CPU (masking noise, augmentation seeds), CUDA, Python's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state, gathered on all ranks (once per checkpoint, not per step)."""
    return all_gather_object(rng_state())


def restore_rng_states(states: list[dict]) -> None:
    """Restore this rank's RNG state; a different world size cannot resume RNG exactly: warn."""
    if len(states) != get_world_size():
        warnings.warn(
            f"checkpoint holds RNG states of {len(states)} ranks, this run has {get_world_size()}: "
            "training continues, but augmentation/masking noise will not match an uninterrupted run"
        )
        return
    set_rng_state(states[get_rank()])


def replica_checksums(model: torch.nn.Module) -> list[str]:
    """Every rank's hash of its model weights (all-gathered): DDP replicas must be bit-identical."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # (0-dim buffers too)
    return all_gather_object(h.hexdigest())


def checkpoint_progress(match: re.Match) -> tuple[int, int]:
    """Order checkpoints by training progress: (epochs fully done, steps into the next)."""
    epoch = int(match.group(1))
    return (epoch, int(match.group(2))) if match.group(2) else (epoch + 1, 0)


def find_latest_checkpoint(output_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint in `output_dir` that loads completely; torn or foreign files are skipped."""
    found = []
    for path in glob.glob(os.path.join(output_dir, CHECKPOINT_GLOB)):
        m = CHECKPOINT_RE.search(os.path.basename(path))
        if m:
            found.append((checkpoint_progress(m), path))
    for _, path in sorted(found, reverse=True):
        try:
            ckpt = load_plain(path)
        except Exception as exc:  # a torn file can fail in many ways (EOF, zip, unpickling)
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}")
            continue
        if isinstance(ckpt, dict) and "model" in ckpt and "epoch" in ckpt:
            return path, ckpt
        warnings.warn(f"skipping {path}: not a complete training checkpoint")
    return None


def checkpoint_path(output_dir: str, epoch: int, step: int | None = None) -> str:
    """checkpoint-E.pth after epoch E; checkpoint-E-stepK.pth when epoch E stopped after K steps."""
    return os.path.join(output_dir, checkpoint_name(epoch, step))


class CheckpointSaveError(RuntimeError):
    """Rank 0 could not write a checkpoint (disk full, quota, permissions): every rank raises it with rank 0's error."""


def save_on_master(obj: Any, path: str) -> None:
    """Rank 0 writes `obj` to `path` (atomic_torch_save); every rank returns once it is written, or raises
    CheckpointSaveError with rank 0's error when it could not be (a collective: the other ranks do not wait for it
    at their next collective until the timeout, under torchrun or srun alike)."""
    from util.dist import broadcast_object

    error = None
    if is_main_process():
        try:
            atomic_torch_save(obj, path)
        except OSError as exc:  # the temporary file is removed; the previous checkpoints are intact
            error = f"{type(exc).__name__}: {exc}"
    error = broadcast_object(error)
    if error is not None:
        raise CheckpointSaveError(
            f"rank 0 could not write {path} ({error}); the checkpoints written before are intact, the training "
            "since the newest of them is lost. Fix: free space in (or the permissions of) --output_dir, then "
            "restart with --auto_resume")


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist. Fix: check --resume, or use --auto_resume")
    return load_plain(path)


def remove_superseded_partials(output_dir: str, completed_epoch: int) -> None:
    """After epoch E is saved complete, mid-epoch checkpoints of epochs <= E are obsolete (main rank)."""
    if not is_main_process():
        return
    for path in glob.glob(os.path.join(output_dir, PARTIAL_CHECKPOINT_GLOB)):
        m = CHECKPOINT_RE.search(os.path.basename(path))
        if m and int(m.group(1)) <= completed_epoch:
            os.remove(path)


def prune_old_checkpoints(output_dir: str, keep: set[int]) -> None:
    """Remove checkpoint-E.pth for completed epochs not in `keep` (main rank only)."""
    if not is_main_process():
        return
    for path in glob.glob(os.path.join(output_dir, CHECKPOINT_GLOB)):
        m = CHECKPOINT_RE.search(os.path.basename(path))
        if m and not m.group(2) and int(m.group(1)) not in keep:
            os.remove(path)


def find_resume_checkpoint(output_dir: str) -> tuple[str, dict] | None:
    """--auto_resume on every rank: rank 0 chooses the newest complete checkpoint, broadcasts its
    path, and all ranks load that file (or all stop with the same error).

    Why not every rank globbing for itself: with node-local or lagging storage the nodes can see
    different newest files and would resume from different epochs.
    """
    from util.dist import any_rank, broadcast_object

    found = find_latest_checkpoint(output_dir) if is_main_process() else None
    path = broadcast_object(found[0] if found else None)
    if path is None:
        return None
    ckpt, problem = (found[1], None) if found else (None, None)
    if ckpt is None:
        try:
            ckpt = load_plain(path)
        except Exception as exc:  # missing on this node, torn, not yet visible: named below
            problem = f"{type(exc).__name__}: {exc}"
    if any_rank(problem is not None):  # collective: no rank goes on alone
        raise ResumeMismatchError(
            f"--auto_resume: rank 0 chose {path}, but rank {get_rank()} cannot load it"
            f"{' (' + problem + ')' if problem else ' (see the other ranks)'}. Fix: put --output_dir on storage "
            "that every node sees (a shared file system), or wait for it to sync, then restart"
        )
    return path, ckpt
