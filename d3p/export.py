"""Export a pre-training run's kept set, or its per-sample trained counts, as a .npy file.

    python -m d3p.export RUN_DIR --out kept.npy            sorted int64 indices kept at the last decision
    python -m d3p.export RUN_DIR --out counts.npy --counts int64 [N]: in how many epochs each sample was trained

RUN_DIR is a pre-training --output_dir (checkpoint-E.pth, log.txt), an arm folder holding it as RUN_DIR/pretrain
(the layout of train_d3p.sh and tools/reproduce_table1.sh), or a checkpoint file. The newest checkpoint that loads
completely is used (a torn one is skipped, as --auto_resume does).

Kept set (without --counts), from checkpoint['pruning']['strategy']:
  d3p           ~pruned of the last decision (all samples before the first decision);
  dynunc, d2    the selected subset (all samples while still in warm-up); OUTPUT_DIR/kept_static.npy if the
                checkpoint lacks it;
  none, infobatch, seta, random, rs2: no persistent kept set (each epoch draws its own) -> error; use --counts.

Trained counts (--counts): counts[i] = the number of epochs in which sample i was in the epoch's kept set, i.e.
trained with gradient (epochs 0..E of checkpoint-E.pth). Distributed padding duplicates are not counted twice, so
counts.sum() == the sum of log.txt's per-epoch `kept`. The per-epoch kept sets of dynamic methods are not stored
in a checkpoint, so exact counts come from:
  1. checkpoint['pruning']['trained_counts'] (int32 [N]): DataPruner adds 1 at plan.kept when it records
     an epoch's costs and saves the array with its state (any method; a resumed run replays the epochs after its
     checkpoint, so the counts stay exact);
  2. for checkpoints written before the engine kept it, an exact reconstruction where one exists, checked against
     the ledger's per-epoch kept counts (and verified equal to the engine's array on real runs):
       none: every sample in every epoch;  dynunc/d2: all samples in warm-up epochs, the subset afterwards;
       random: its per-epoch subsets replayed (they depend only on (seed, epoch));
       d3p with at most one decision: all samples before it (and in annealing epochs), ~pruned after;
  3. otherwise (d3p with several decisions, infobatch, seta) an error: re-run with the current engine.

Bad input (missing folder, no checkpoint, unusable checkpoint) -> a usage error naming the problem and the fix,
exit code 2.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

import numpy as np

NO_KEPT_SET = ("none", "infobatch", "seta", "random", "rs2")
STATIC = ("dynunc", "d2")
ENGINE_CHANGE = (
    "exact per-sample counts need checkpoint['pruning']['trained_counts'], which this checkpoint predates "
    "(DataPruner records them at every epoch and saves them with its state). Fix: re-run pre-training "
    "with the current engine"
)


class ExportError(ValueError):
    """A problem with the input run; the message names it and the fix."""


# ------------------------------------------------------------------------------------------------ loading
def resolve_checkpoint(run: str) -> tuple[str, dict[str, Any]]:
    """(path, checkpoint) of the newest complete checkpoint of RUN_DIR (or of the checkpoint file RUN_DIR)."""
    import torch

    if os.path.isfile(run):
        try:
            ckpt = torch.load(run, map_location="cpu", weights_only=True)
        except Exception as exc:  # torn file, not a torch file, ...
            raise ExportError(f"{run} cannot be loaded as a checkpoint ({type(exc).__name__}: {exc}). "
                              "Fix: pass a pre-training output folder or a complete checkpoint-E.pth") from None
        return run, ckpt
    if not os.path.isdir(run):
        raise ExportError(f"{run}: no such folder. Fix: pass the --output_dir of a pre-training run "
                          "(the folder holding checkpoint-E.pth and log.txt)")
    folder = run
    if not glob.glob(os.path.join(folder, "checkpoint-*.pth")) and os.path.isdir(os.path.join(run, "pretrain")):
        folder = os.path.join(run, "pretrain")  # an arm folder of train_d3p.sh / reproduce_table1.sh
    if not glob.glob(os.path.join(folder, "checkpoint-*.pth")):
        raise ExportError(f"{run} holds no checkpoint-E.pth. Fix: pass the --output_dir of a pre-training run "
                          "that has saved at least one checkpoint (see --save_every), or wait for its first save")
    from d3p.checkpoints import find_latest_checkpoint

    found = find_latest_checkpoint(folder)
    if found is None:
        raise ExportError(f"no checkpoint in {folder} loads completely. Fix: wait for the run to save a complete "
                          "checkpoint, or resume it with --auto_resume")
    return found


def pruning_state(path: str, ckpt: Any) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("pruning"), dict):
        raise ExportError(f"{path} has no 'pruning' state: it is not a checkpoint of main_pretrain_d3p.py. "
                          "Fix: pass a run of main_pretrain_d3p.py")
    state = ckpt["pruning"]
    for key in ("method", "num_samples", "strategy"):
        if key not in state:
            raise ExportError(f"{path}: checkpoint['pruning'] lacks {key!r}. Fix: pass a run of main_pretrain_d3p.py")
    return state


def _np(x: Any, dtype) -> np.ndarray:
    if hasattr(x, "numpy"):
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else x.numpy()
    return np.asarray(x).astype(dtype, copy=True)


# --------------------------------------------------------------------------------------------- kept set
def kept_indices(path: str, ckpt: dict[str, Any]) -> tuple[np.ndarray, str]:
    """Sorted int64 indices kept at the last decision, and a note for the report."""
    state = pruning_state(path, ckpt)
    method, n, strat = state["method"], int(state["num_samples"]), state["strategy"]
    if method == "d3p":
        pruned = _np(strat["pruned"], bool)
        if pruned.shape != (n,):
            raise ExportError(f"{path}: D3P 'pruned' has shape {pruned.shape}, expected ({n},)")
        note = "d3p: ~pruned of the last decision" if int(strat.get("decisions", 1)) else "d3p: no decision yet, all kept"
        return np.flatnonzero(~pruned).astype(np.int64), note
    if method in STATIC:
        subset = strat.get("subset")
        if subset is None:
            side = os.path.join(os.path.dirname(os.path.abspath(path)), "kept_static.npy")
            if "subset" not in strat and os.path.isfile(side):
                return np.sort(np.load(side).astype(np.int64)), f"{method}: subset from {side}"
            return np.arange(n, dtype=np.int64), f"{method}: still in warm-up (no selection yet), all kept"
        return np.sort(_np(subset, np.int64)), f"{method}: the selected static subset"
    if method in NO_KEPT_SET:
        raise ExportError(f"method {method!r} has no persistent kept set (it draws a new subset every epoch). "
                          "Fix: use --counts for the per-sample trained counts")
    raise ExportError(f"{path}: unknown pruning method {method!r}")


# ---------------------------------------------------------------------------------------------- counts
def _ledger_epochs(path: str, state: dict[str, Any]) -> list[dict[str, Any]]:
    epochs = sorted((dict(e) for e in state.get("ledger", {}).get("epochs", [])), key=lambda e: int(e["epoch"]))
    if not epochs:
        raise ExportError(f"{path}: the cost ledger records no epoch. Fix: pass a checkpoint saved after an epoch")
    if [int(e["epoch"]) for e in epochs] != list(range(len(epochs))):
        raise ExportError(f"{path}: the ledger's epochs are not 0..{len(epochs) - 1}; cannot reconstruct the counts")
    return epochs


def trained_counts(path: str, ckpt: dict[str, Any]) -> tuple[np.ndarray, str]:
    """int64 [N]: in how many epochs each sample was trained with gradient (exact, or an error)."""
    state = pruning_state(path, ckpt)
    method, n, strat = state["method"], int(state["num_samples"]), state["strategy"]
    if state.get("trained_counts") is not None:
        counts = _np(state["trained_counts"], np.int64)
        if counts.shape != (n,):
            raise ExportError(f"{path}: trained_counts has shape {counts.shape}, expected ({n},)")
        return counts, "recorded by the engine (checkpoint['pruning']['trained_counts'])"
    epochs = _ledger_epochs(path, state)
    kept_per_epoch = [int(e["kept"]) for e in epochs]
    counts = np.zeros(n, dtype=np.int64)
    if method == "none":
        counts += len(epochs)
        note = "none: every sample in every epoch"
    elif method in STATIC:
        warm = int(strat["warmup_epochs"])
        counts += min(warm, len(epochs))
        if len(epochs) > warm:
            if strat.get("subset") is None:
                raise ExportError(f"{path}: {method} trained past warm-up but its checkpoint has no subset")
            counts[_np(strat["subset"], np.int64)] += len(epochs) - warm
        note = f"{method}: {warm} warm-up epochs on all data, the subset afterwards"
    elif method == "random":
        from d3p.methods.random import RandomDynamic

        rnd = RandomDynamic(n, float(strat["prune_ratio"]), seed=int(strat["seed"]),
                            kept_counts=strat.get("kept_counts"))
        for e in range(len(epochs)):
            np.add.at(counts, rnd.plan_epoch(e).kept, 1)
        note = "random: per-epoch subsets replayed from (seed, epoch)"
    elif method == "d3p" and int(strat.get("decisions", 0)) <= 1:
        kept_set = np.flatnonzero(~_np(strat["pruned"], bool))
        for k in kept_per_epoch:
            if k == n:
                counts += 1
            elif k == kept_set.size:
                counts[kept_set] += 1
            else:
                raise ExportError(f"{path}: an epoch kept {k} samples, neither all ({n}) nor the decision's "
                                  f"{kept_set.size}; {ENGINE_CHANGE}")
        note = "d3p (one decision): all samples before it, ~pruned after"
    else:
        raise ExportError(f"{path}: method {method!r} chooses a new kept set from the losses "
                          f"({'several decisions' if method == 'd3p' else 'every epoch'}) and does not store "
                          f"past ones; {ENGINE_CHANGE}")
    if int(counts.sum()) != sum(kept_per_epoch):
        raise ExportError(f"{path}: reconstructed counts sum to {int(counts.sum())}, the ledger's per-epoch kept to "
                          f"{sum(kept_per_epoch)}: the checkpoint does not match the method's rules; {ENGINE_CHANGE}")
    return counts, note


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m d3p.export",
        description="Export the kept set (sorted int64 indices at the last decision) or, with --counts, the "
                    "per-sample trained counts (int64 [N]) of a pre-training run.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="pre-training --output_dir, an arm folder holding pretrain/, or a checkpoint-E.pth")
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--counts", action="store_true",
                   help="write how many epochs each sample was trained with gradient instead of the kept set")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path, ckpt = resolve_checkpoint(args.run_dir)
        state = pruning_state(path, ckpt)
        arr, note = (trained_counts if args.counts else kept_indices)(path, ckpt)
    except ExportError as exc:
        parser.error(str(exc))  # exit code 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.error(f"--out {args.out}: folder {out_dir} does not exist. Fix: create it or pick another path")
    np.save(args.out, arr.astype(np.int64))
    n = int(state["num_samples"])
    report = {"checkpoint": path, "epoch": ckpt.get("epoch"), "method": state["method"], "num_samples": n,
              "out": args.out, "note": note}
    if args.counts:
        report.update(total_trained=int(arr.sum()), never_trained=int((arr == 0).sum()))
    else:
        report.update(kept=int(arr.size), pruned=n - int(arr.size))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
