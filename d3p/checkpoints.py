"""Loading a checkpoint as plain data (d3p-export; the training scripts' reader uses it too), and writing one
atomically (every file the library itself writes)."""
from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
from typing import Any

import torch


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


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in `path`'s folder (made if missing), fsync, rename over `path`, fsync the
    folder: a crash or a full disk mid-write leaves the previous file (or none), never a torn one. The one atomic
    save of the project (the training scripts' checkpoints: util.checkpoint.atomic_torch_save is this)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)  # the rename itself survives a crash
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
