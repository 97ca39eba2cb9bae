"""Finding a run's newest complete checkpoint (d3p.export; the training scripts' --auto_resume uses it too)."""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import re
import warnings
from typing import Any

import torch

# checkpoint-E.pth: epoch E completed; checkpoint-E-stepK.pth: epoch E interrupted after K steps
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)(?:-step(\d+))?\.pth$")


def checkpoint_progress(match: re.Match) -> tuple[int, int]:
    """Order checkpoints by training progress: (epochs fully done, steps into the next)."""
    epoch = int(match.group(1))
    return (epoch, int(match.group(2))) if match.group(2) else (epoch + 1, 0)


class CheckpointFormatError(ValueError):
    """A checkpoint holding objects other than plain data: refused (unpickling them could run code)."""


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_plain(path: str) -> Any:
    """torch.load(weights_only=True) of `path`, allowing one class besides plain data: argparse.Namespace.

    MAE's own scripts save `args` as an argparse.Namespace (attribute data, no code); every other class is
    refused with a CheckpointFormatError that names it.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL_RE.search(str(exc))
        raise CheckpointFormatError(
            f"checkpoint {path} holds {found.group(1) if found else 'an object'}, which is not plain data: only "
            "tensors, numbers, strings, containers and argparse.Namespace (MAE's `args`) load, because unpickling "
            "anything else can run code. Fix: in a session you trust, load it with weights_only=False and re-save "
            "the plain parts, e.g. torch.save({'model': ckpt['model']}, path)"
        ) from exc


def find_latest_checkpoint(output_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint in `output_dir` that loads completely; torn or foreign files are skipped."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
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
