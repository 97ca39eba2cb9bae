"""What this fork's scripts write into a run folder: the name of every file (one constant each, used by every writer
and reader), and two readers: the per-epoch kept counts of log.txt (`--random_match RUN_DIR`), and the newest
complete checkpoint of a pre-training run for exporting its data (`tools/export_run.py`). The d3p package knows
none of these names; it takes the values read here.

A run folder is a pre-training or fine-tuning --output_dir (checkpoint-E.pth, log.txt, summary.json,
kept_static.npy, mislabelled.npy), a k-NN --output_dir (summary.json, predictions.npy), or an arm folder holding
them as RUN_DIR/pretrain, RUN_DIR/finetune, ... (the layout of train_d3p.sh and tools/reproduce_table1.sh, which
also keeps tools/match_ratio.py's ratio_match.json there).

Importing this module imports nothing heavy (util.checkpoint imports its names; the readers import torch and d3p
when called), so any module can use the names without an import cycle.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from pathlib import Path
from typing import Any

LOG_FILE = "log.txt"  # one JSON object per epoch (util.run.append_log)
SUMMARY_FILE = "summary.json"  # the run's result, written at its end
STATIC_SUBSET_FILE = "kept_static.npy"  # a static method's coreset (pre-training)
MISLABELLED_FILE = "mislabelled.npy"  # --label_noise's mask of replaced labels (fine-tuning)
PREDICTIONS_FILE = "predictions.npy"  # main_knn.py's ranked classes per validation sample
RATIO_MATCH_FILE = "ratio_match.json"  # tools/match_ratio.py's prediction, kept in an arm folder
CHECKPOINT_GLOB = "checkpoint-*.pth"  # every checkpoint, mid-epoch ones included
PARTIAL_CHECKPOINT_GLOB = "checkpoint-*-step*.pth"  # mid-epoch checkpoints only
# checkpoint-E.pth: epoch E completed; checkpoint-E-stepK.pth: epoch E interrupted after K steps
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)(?:-step(\d+))?\.pth$")


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """checkpoint-E.pth after epoch E; checkpoint-E-stepK.pth when epoch E stopped after K steps."""
    return f"checkpoint-{epoch}{'' if step is None else f'-step{step}'}.pth"


def has_checkpoint(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, CHECKPOINT_GLOB)))


def read_kept_counts(run_dir: str | Path) -> list[int]:
    """Kept counts of a recorded run, indexed by 0-based epoch, from RUN_DIR/log.txt.

    log.txt holds one JSON object per line with integer fields `epoch` (0-based) and `kept`. Blank lines are
    skipped; when an epoch appears twice (a resumed run re-logged it) the last line wins. Raises ValueError naming
    the file and the offending line, field or missing epochs; FileNotFoundError if the file does not exist.
    """
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the log.txt of a recorded D3P run)")
    counts: dict[int, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        values = {}
        for field_name in ("epoch", "kept"):
            if field_name not in row:
                raise ValueError(f"{path}:{lineno}: missing field {field_name!r} (fields: {sorted(row)})")
            value = row[field_name]
            if isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            ):
                raise ValueError(f"{path}:{lineno}: field {field_name!r} must be an integer, got {value!r}")
            values[field_name] = int(value)
        if values["epoch"] < 0 or values["kept"] < 0:
            raise ValueError(f"{path}:{lineno}: negative epoch or kept count: {values}")
        counts[values["epoch"]] = values["kept"]
    if not counts:
        raise ValueError(f"{path}: no epoch lines")
    last = max(counts)
    missing = [e for e in range(last + 1) if e not in counts]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"{path}: epochs {shown} are missing (found epochs up to {last})")
    return [counts[e] for e in range(last + 1)]


def pruning_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """DataPruner options that the flags name by run folder, read from it: --random_match RUN_DIR -> its kept
    counts. Pass them to `DataPruner.from_args(args, n, **pruning_inputs(args))`."""
    run = getattr(args, "random_match", None)
    return {"random_match": read_kept_counts(run)} if run else {}


def resolve_run_checkpoint(run: str) -> tuple[str, dict[str, Any]]:
    """(path, checkpoint) of the newest complete checkpoint of RUN_DIR (an output folder, an arm folder holding it
    as pretrain/, or a checkpoint file). A static method's subset missing from an old checkpoint is filled in from
    the folder's kept_static.npy."""
    from d3p.checkpoints import load_plain
    from d3p.export import ExportError
    from util.checkpoint import find_latest_checkpoint

    if os.path.isfile(run):
        try:
            return run, load_plain(run)
        except Exception as exc:  # torn file, not a torch file, not plain data
            raise ExportError(f"{run} cannot be loaded as a checkpoint ({type(exc).__name__}: {exc}). "
                              "Fix: pass a pre-training output folder or a complete checkpoint-E.pth") from None
    if not os.path.isdir(run):
        raise ExportError(f"{run}: no such folder. Fix: pass the --output_dir of a pre-training run "
                          "(the folder holding checkpoint-E.pth and log.txt)")
    folder = run
    if not has_checkpoint(folder) and os.path.isdir(os.path.join(run, "pretrain")):
        folder = os.path.join(run, "pretrain")  # an arm folder of train_d3p.sh / reproduce_table1.sh
    if not has_checkpoint(folder):
        raise ExportError(f"{run} holds no checkpoint-E.pth. Fix: pass the --output_dir of a pre-training run "
                          "that has saved at least one checkpoint (see --save_every), or wait for its first save")
    found = find_latest_checkpoint(folder)
    if found is None:
        raise ExportError(f"no checkpoint in {folder} loads completely. Fix: wait for the run to save a complete "
                          "checkpoint, or resume it with --auto_resume")
    path, ckpt = found
    _fill_static_subset(path, ckpt)
    return path, ckpt


def _fill_static_subset(path: str, ckpt: Any) -> None:
    """Checkpoints of early versions lack a static method's subset; the engine saved it beside them."""
    import numpy as np
    import torch

    from d3p.registry import method_names

    pruning = ckpt.get("pruning") if isinstance(ckpt, dict) else None
    if not isinstance(pruning, dict) or pruning.get("method") not in method_names("static"):
        return
    strategy = pruning.get("strategy")
    side = os.path.join(os.path.dirname(os.path.abspath(path)), STATIC_SUBSET_FILE)
    if isinstance(strategy, dict) and "subset" not in strategy and os.path.isfile(side):
        strategy["subset"] = torch.from_numpy(np.sort(np.load(side).astype(np.int64)))
