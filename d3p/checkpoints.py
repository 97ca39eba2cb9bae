"""Loading a checkpoint as plain data (d3p-export; the training scripts' reader uses it too)."""
from __future__ import annotations

import argparse
import pickle
import re
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
