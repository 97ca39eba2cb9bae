"""Export the kept set, or the per-sample trained counts, of a checkpoint holding a `DataPruner` state, as .npy.

    d3p-export CHECKPOINT --out kept.npy              sorted int64 indices kept at the last decision
    d3p-export CHECKPOINT --out counts.npy --counts   int64 [N]: in how many epochs each sample was trained

CHECKPOINT is a torch file (plain data) holding checkpoint['pruning'] = pruner.state_dict(), or the state itself.
Finding the newest checkpoint of a training run is the training scripts' business: `main(argv, resolve=...)`
takes their finder.

Kept set (without --counts), from the method's registry entry (`d3p.registry`):
  a method with a `kept_set` (d3p: ~pruned of the last decision, all samples before the first decision);
  kind "static" (dynunc, d2, ...): the selected subset, the strategy state's "subset" (all samples in warm-up);
  other dynamic methods (none, infobatch, seta, random) keep no persistent set (each epoch draws its own) -> an
  error; use --counts.

Trained counts (--counts): counts[i] = the number of epochs in which sample i was in the epoch's kept set, i.e.
trained with gradient. Distributed padding duplicates are not counted twice, so counts.sum() == the sum of the
ledger's per-epoch `kept`. The per-epoch kept sets of dynamic methods are not stored in a checkpoint, so exact
counts come from:
  1. checkpoint['pruning']['trained_counts'] (int32 [N]): DataPruner adds 1 at plan.kept when it records
     an epoch's costs and saves the array with its state (any method; a resumed run replays the epochs after its
     checkpoint, so the counts stay exact);
  2. for checkpoints written before DataPruner kept it, an exact reconstruction where one exists, checked against
     the ledger's per-epoch kept counts:
       none: every sample in every epoch;  static methods: all samples in warm-up epochs, the subset afterwards;
       random: its per-epoch subsets replayed (they depend only on (seed, epoch));
       d3p with at most one decision: all samples before it (and in annealing epochs), ~pruned after;
  3. otherwise (d3p with several decisions, infobatch, seta, methods of plugins) an error.

Bad input (missing file, unusable checkpoint) -> a usage error naming the problem and the fix, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import numpy as np

from d3p.registry import get_method, import_prune_plugins, method_names

ENGINE_CHANGE = (
    "exact per-sample counts need checkpoint['pruning']['trained_counts'], which this checkpoint predates "
    "(DataPruner records them at every epoch and saves them with its state). Fix: re-run training "
    "with the current d3p"
)


class ExportError(ValueError):
    """A problem with the input; the message names it and the fix."""


# ------------------------------------------------------------------------------------------------ loading
def load_checkpoint_file(path: str) -> tuple[str, dict[str, Any]]:
    """(path, checkpoint) of a checkpoint file (plain data only)."""
    from d3p.checkpoints import load_plain

    if os.path.isdir(path):
        raise ExportError(f"{path} is a folder. Fix: pass the checkpoint file that holds the pruner's state "
                          "(checkpoint['pruning'] = pruner.state_dict()), e.g. the newest one the run saved")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such file. Fix: pass a checkpoint that holds the pruner's state")
    try:
        return path, load_plain(path)
    except Exception as exc:  # torn file, not a torch file, not plain data
        raise ExportError(f"{path} cannot be loaded as a checkpoint ({type(exc).__name__}: {exc}). "
                          "Fix: pass a complete checkpoint file") from None


def pruning_state(path: str, ckpt: Any) -> dict[str, Any]:
    """checkpoint['pruning'] (a `DataPruner.state_dict()`), or the checkpoint itself when it is one."""
    state = ckpt.get("pruning", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not {"method", "num_samples", "strategy"} <= set(state):
        raise ExportError(f"{path} holds no pruner state (method, num_samples, strategy). Fix: pass a checkpoint "
                          "that saved checkpoint['pruning'] = pruner.state_dict()")
    return state


def _np(x: Any, dtype) -> np.ndarray:
    if hasattr(x, "numpy"):
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else x.numpy()
    return np.asarray(x).astype(dtype, copy=True)


# --------------------------------------------------------------------------------------------- kept set
def _spec(path: str, method: str):
    try:
        return get_method(method)
    except ValueError:
        raise ExportError(f"{path}: pruning method {method!r} is not registered. Fix: pass --prune_plugin with the "
                          "module that registers it") from None


def kept_indices(path: str, ckpt: dict[str, Any]) -> tuple[np.ndarray, str]:
    """Sorted int64 indices kept at the last decision, and a note for the report."""
    state = pruning_state(path, ckpt)
    method, n, strat = state["method"], int(state["num_samples"]), state["strategy"]
    spec = _spec(path, method)
    if spec.kept_set is not None:
        kept = np.sort(_np(spec.kept_set(strat), np.int64))
        if kept.size and not (0 <= kept[0] and kept[-1] < n):
            raise ExportError(f"{path}: {method}'s kept set holds indices outside [0, {n})")
        decided = int(strat.get("decisions", 1))
        return kept, f"{method}: the kept set of the last decision" if decided else f"{method}: no decision yet, all kept"
    if spec.kind == "static":
        subset = strat.get("subset")
        if subset is None:
            return np.arange(n, dtype=np.int64), f"{method}: still in warm-up (no selection yet), all kept"
        return np.sort(_np(subset, np.int64)), f"{method}: the selected static subset"
    raise ExportError(f"method {method!r} has no persistent kept set (it draws a new subset every epoch). "
                      "Fix: use --counts for the per-sample trained counts")


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
    elif method in method_names("static"):
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
def build_parser(prog: str = "d3p-export", source_help: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export the kept set (sorted int64 indices at the last decision) or, with --counts, the "
                    "per-sample trained counts (int64 [N]) of a training run's pruner state.",
    )
    p.add_argument("source", metavar="CHECKPOINT",
                   help=source_help or "a checkpoint file holding checkpoint['pruning'] = pruner.state_dict()")
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--counts", action="store_true",
                   help="write how many epochs each sample was trained with gradient instead of the kept set")
    p.add_argument("--prune_plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="import a module that registers the run's method (a method of your own)")
    return p


Resolve = Callable[[str], "tuple[str, dict[str, Any]]"]


def main(argv: list[str] | None = None, resolve: Resolve = load_checkpoint_file, parser: argparse.ArgumentParser | None = None) -> int:
    """The CLI. resolve: SOURCE -> (path, checkpoint); a training project passes its run-folder finder."""
    parser = parser or build_parser()
    import_prune_plugins(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        path, ckpt = resolve(args.source)
        state = pruning_state(path, ckpt)
        arr, note = (trained_counts if args.counts else kept_indices)(path, ckpt)
    except ExportError as exc:
        parser.error(str(exc))  # exit code 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.error(f"--out {args.out}: folder {out_dir} does not exist. Fix: create it or pick another path")
    np.save(args.out, arr.astype(np.int64))
    n = int(state["num_samples"])
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    report = {"checkpoint": path, "epoch": epoch, "method": state["method"], "num_samples": n,
              "out": args.out, "note": note}
    if args.counts:
        report.update(total_trained=int(arr.sum()), never_trained=int((arr == 0).sum()))
    else:
        report.update(kept=int(arr.size), pruned=n - int(arr.size))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
