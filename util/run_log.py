"""A run's log files: log.txt (one JSON line per epoch), summary.json and the TensorBoard events (rank 0)."""
from __future__ import annotations

import json
import os

from util.dist import is_main_process
from util.run_folder import LOG_FILE, SUMMARY_FILE


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
        with open(os.path.join(output_dir, LOG_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")


def write_summary(output_dir: str, summary: dict) -> None:
    """OUTPUT_DIR/summary.json (rank 0): the run's figures and its cost ledger."""
    if is_main_process():
        with open(os.path.join(output_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
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
