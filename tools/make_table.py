#!/usr/bin/env python
"""Print the D3P paper's Table 1 (Markdown) from finished runs.

    python tools/make_table.py OUT/none OUT/d3p OUT/infobatch ...      (or OUT/*)
    python tools/make_table.py OUT/* --json                             rows as JSON

Each RUN_DIR is one of
  * an arm folder as written by tools/reproduce_table1.sh / train_d3p.sh: RUN_DIR/pretrain/summary.json,
    RUN_DIR/knn/summary.json (main_knn.py), RUN_DIR/finetune/summary.json, RUN_DIR/linprobe/summary.json, and
    optionally RUN_DIR/finetune_<data set>/summary.json (a second fine-tuning data set, e.g. CIFAR-100 after
    CIFAR-10 pre-training) and RUN_DIR/ratio_match.json (tools/match_ratio.py: the arm ran at the prune ratio
    of the D3P arm of its seed);
  * a pre-training --output_dir itself (its summary.json has mode 'pretrain'). Its k-NN / fine-tune /
    linear-probe summaries are looked up, first match wins, in RUN_DIR/{knn,finetune,linprobe}/, then (when
    RUN_DIR is named 'pretrain') in its siblings ../{knn,finetune,linprobe}/, then in RUN_DIR_{mode}/ and
    RUN_DIR-{mode}/, and finally in any sibling folder whose summary.json has that mode and whose 'finetune'
    (k-NN: 'checkpoint') checkpoint lies in RUN_DIR;
  * a folder with only finetune/ and/or linprobe/ summaries whose 'finetune' is empty: fine-tuning from scratch,
    shown as "No pre-training" (the reference that shows what pre-training buys).
  * a supervised run with pruning (main_finetune.py --prune_method, e.g. tools/reproduce_supervised.sh): its
    summary.json has mode 'finetune'/'linprobe' and the pruning fields; the row takes cost, prune ratio and
    wall-clock from it and its final_acc1 as the top-1 (a table of such runs only has one "Top-1" column).
A folder without a pre-training summary yet (still running) is listed in the footnote and skipped.

Columns: Prune ratio = 1 - trained / (epochs * N) of the pre-training run; k-NN top-1 = main_knn.py's top1
(deterministic: no seed noise beyond the pre-training's); FT / LP top-1 = the fine-tune / linear-probe
summary's final_acc1 (--acc best: best_acc1); accuracies carry the difference to the Whole-dataset row
(`82.8 (↓0.5)`; the Whole row itself `83.3 (–)`); Compute saved = 1 - cost / cost of Whole, cost = samples
trained + forward-only samples / 3 (spec §9); Loader saved = 1 - images loaded / Whole's, images loaded =
samples trained + forward-only samples (each a full decode); Wall-clock saved = 1 - pre-training wall_seconds /
Whole's. Rows at equal ratio (ratio_match.json, and Random matched to D3P) say "= D3P ratio". Runs of
one method (same flags apart from the seed) are pooled: mean ± std (sample std) over seeds, with the seed count in
the Method column; a column with fewer results than seeds says `[k of n]`. Missing results print '—'. Without a
Whole row, compute saved falls back to each run's own figure (vs full data) and wall-clock saved is '—'.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

EQUAL = "@d3p"  # key suffix of an arm run at the prune ratio of the D3P arm of its seed
ORDER = ["none", "infobatch", "seta", "d3p", "random", "dynunc", "d2", "random_matched", "infobatch" + EQUAL,
         "seta" + EQUAL, "random" + EQUAL, "dynunc" + EQUAL, "d2" + EQUAL, "scratch"]
DISPLAY = {
    "none": "Whole dataset", "infobatch": "InfoBatch", "seta": "SeTa", "d3p": "D3P",
    "random_matched": "Random (matched to D3P)", "random": "Random", "dynunc": "Dyn-Unc", "d2": "D2 Pruning",
    "scratch": "No pre-training",
}
# flags that differ between seeds of one configuration, so they do not split a group
_PER_SEED_FLAGS = ("random_match",)
# flags solved per seed for an equal-ratio arm (tools/match_ratio.py)
_MATCHED_FLAGS = ("prune_ratio", "seta_window_scale")
_CONFIG_FIELDS = ("epochs", "model", "data_set", "num_samples")
FORWARD_ONLY_COST = 1.0 / 3.0
DASH = "—"


@dataclass
class Run:
    """One arm folder / seed: its pre-training, fine-tune and linear-probe summaries."""

    folder: str
    pretrain: dict[str, Any] | None
    finetune: dict[str, Any] | None
    linprobe: dict[str, Any] | None
    sources: list[str] = field(default_factory=list)
    knn: dict[str, Any] | None = None
    finetune2: dict[str, Any] | None = None  # a second fine-tuning data set (finetune_<data set>/)
    finetune2_name: str | None = None
    ratio_match: dict[str, Any] | None = None  # tools/match_ratio.py's record: run at D3P's ratio
    supervised: bool = False  # a pruned supervised run: `pretrain` is its own summary (costs), `finetune` too

    @property
    def key(self) -> str:
        if self.pretrain is None:
            return "scratch"
        method = self.pretrain.get("method", "?")
        if method == "random" and (self.pretrain.get("flags") or {}).get("random_match"):
            return "random_matched"
        return method + EQUAL if self.ratio_match is not None else method

    @property
    def equal_ratio(self) -> bool:
        return self.key == "random_matched" or self.key.endswith(EQUAL)

    def config(self) -> tuple:
        """Everything that defines the configuration apart from the seed."""
        if self.pretrain is None:
            ft = self.finetune or self.linprobe or {}
            return (("model", ft.get("model")),)
        per_seed = _PER_SEED_FLAGS + (_MATCHED_FLAGS if self.ratio_match is not None else ())
        flags = {k: v for k, v in (self.pretrain.get("flags") or {}).items() if k not in per_seed}
        return tuple((k, self.pretrain.get(k)) for k in _CONFIG_FIELDS) + tuple(sorted(flags.items()))


# ------------------------------------------------------------------------------------------------- loading
def _read(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"warning: skipping unreadable {path}: {exc}", file=sys.stderr)
        return None
    return data if isinstance(data, dict) else None


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _find_downstream(pre_dir: str, mode: str) -> tuple[str, dict[str, Any]] | None:
    """The `mode` ('knn' | 'finetune' | 'linprobe') summary paired with the pre-training folder pre_dir."""
    pre_dir = os.path.normpath(pre_dir)
    parent, base = os.path.split(pre_dir)
    if base in ("", "."):  # "." (or "/"): look at the real folder name
        parent, base = os.path.split(os.path.abspath(pre_dir))
    candidates = [os.path.join(pre_dir, mode, "summary.json")]
    if base == "pretrain":
        candidates.append(os.path.join(parent, mode, "summary.json"))
    candidates += [f"{pre_dir}_{mode}/summary.json", f"{pre_dir}-{mode}/summary.json"]
    for path in candidates:
        data = _read(path)
        if data is not None and data.get("mode", mode) == mode:
            return path, data
    for path in sorted(glob.glob(os.path.join(parent, "*", "summary.json"))):  # paired by checkpoint path
        data = _read(path)
        ckpt = (data or {}).get("checkpoint" if mode == "knn" else "finetune")
        if data and data.get("mode") == mode and ckpt and _same_dir(os.path.dirname(ckpt), pre_dir):
            return path, data
    return None


def load_run(folder: str) -> Run | None:
    """The Run of an arm folder or a pre-training folder; None (with a note) when nothing finished yet."""
    folder = os.path.normpath(folder)
    arm_pre = os.path.join(folder, "pretrain", "summary.json")
    own = os.path.join(folder, "summary.json")
    own_data = _read(own) or {}
    pre_dir, pre_path = None, None
    if own_data.get("mode") in ("finetune", "linprobe") and "samples_trained" in own_data:
        return Run(folder, own_data, own_data if own_data["mode"] == "finetune" else None,
                   own_data if own_data["mode"] == "linprobe" else None, [own], supervised=True)
    if os.path.isfile(arm_pre):
        pre_dir, pre_path = os.path.join(folder, "pretrain"), arm_pre
    elif own_data.get("mode") == "pretrain" or ("mode" not in own_data and "method" in own_data):
        pre_dir, pre_path = folder, own
    if pre_dir is None:
        ft_path, lp_path = (os.path.join(folder, m, "summary.json") for m in ("finetune", "linprobe"))
        ft, lp = _read(ft_path), _read(lp_path)
        if (ft or lp) and not (ft or lp).get("finetune"):
            return Run(folder, None, ft, lp, [p for p, d in ((ft_path, ft), (lp_path, lp)) if d])
        return None
    pre = _read(pre_path)
    if pre is None:
        return None
    run = Run(folder, pre, None, None, [pre_path])
    for mode in ("knn", "finetune", "linprobe"):
        found = _find_downstream(pre_dir, mode)
        if found:
            setattr(run, mode, found[1])
            run.sources.append(found[0])
    # a second fine-tuning data set: RUN_DIR/finetune_<data set>/ (or ../finetune_<data set>/ of a 'pretrain' folder)
    arm_dir = folder if pre_dir != folder else (os.path.dirname(pre_dir) if os.path.basename(pre_dir) == "pretrain"
                                                else None)
    for path in sorted(glob.glob(os.path.join(arm_dir, "finetune_*", "summary.json"))) if arm_dir else []:
        data = _read(path)
        if data and data.get("mode", "finetune") == "finetune":
            run.finetune2, run.finetune2_name = data, os.path.basename(os.path.dirname(path))[len("finetune_"):]
            run.sources.append(path)
            break
    for path in (os.path.join(folder, "ratio_match.json"), os.path.join(pre_dir, "ratio_match.json")):
        data = _read(path)
        if data is not None:
            run.ratio_match = data
            break
    return run


# ------------------------------------------------------------------------------------------------ numbers
def mean_std(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _cost(pre: dict[str, Any]) -> float:
    return float(pre["samples_trained"]) + FORWARD_ONLY_COST * float(pre.get("samples_forward_only", 0))


def _loaded(pre: dict[str, Any]) -> float:
    """Images the loaders decoded (summaries written before the ledger counted them: trained + forward-only)."""
    if pre.get("samples_loaded") is not None:
        return float(pre["samples_loaded"])
    return float(pre["samples_trained"]) + float(pre.get("samples_forward_only", 0))


def _acc(summary: dict[str, Any] | None, which: str) -> float | None:
    if summary is None:
        return None
    value = summary.get("top1") if summary.get("mode") == "knn" else summary.get(f"{which}_acc1")
    return None if value is None else float(value)


# accuracy columns: (row column, Run attribute)
ACC_COLUMNS = (("knn_top1", "knn"), ("ft_top1", "finetune"), ("ft2_top1", "finetune2"), ("lp_top1", "linprobe"))


def build_rows(runs: list[Run], acc: str = "final") -> list[dict[str, Any]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.key, run.config()), []).append(run)
    by_key: dict[str, list[tuple]] = {}
    for gk in groups:
        by_key.setdefault(gk[0], []).append(gk[1])

    def label(key: str, config: tuple) -> str:
        base = key[: -len(EQUAL)] if key.endswith(EQUAL) else key
        name = DISPLAY.get(base, base) + (" (= D3P ratio)" if key.endswith(EQUAL) else "")
        variants = by_key[key]
        if len(variants) > 1:  # several configurations of one method: name what differs
            differ = [(k, v) for k, v in config if any(dict(o).get(k) != v for o in variants if o != config)]
            name += " (" + ", ".join(f"{k}={v}" for k, v in differ) + ")"
        return name

    whole_gk = ("none", by_key["none"][0]) if "none" in by_key else None
    if "none" in by_key and len(by_key["none"]) > 1:
        print(f"warning: {len(by_key['none'])} Whole-dataset configurations; deltas are against the first",
              file=sys.stderr)
    whole_runs = groups[whole_gk] if whole_gk else []
    whole_cost = mean_std([_cost(r.pretrain) for r in whole_runs])[0] if whole_runs else None
    whole_loaded = mean_std([_loaded(r.pretrain) for r in whole_runs])[0] if whole_runs else None
    whole_wall = mean_std([float(r.pretrain["wall_seconds"]) for r in whole_runs])[0] if whole_runs else None
    whole_acc = {}
    for col, attr in ACC_COLUMNS:
        vals = [a for a in (_acc(getattr(r, attr), acc) for r in whole_runs) if a is not None]
        whole_acc[col] = mean_std(vals)[0] if vals else None

    rows = []
    ordered = sorted(groups, key=lambda gk: (ORDER.index(gk[0]) if gk[0] in ORDER else len(ORDER), gk[0], str(gk[1])))
    for gk in ordered:
        members = sorted(groups[gk], key=lambda r: ((r.pretrain or {}).get("seed", 0), r.folder))
        is_whole = gk == whole_gk
        pre = [r.pretrain for r in members if r.pretrain is not None]
        row: dict[str, Any] = {
            "key": gk[0], "method": label(*gk), "seeds": len(members), "is_whole": is_whole,
            "equal_ratio": members[0].equal_ratio,
            "ft2_name": next((r.finetune2_name for r in members if r.finetune2_name), None),
            "seed_list": [(r.pretrain or {}).get("seed") for r in members],
            "folders": [r.folder for r in members], "sources": [s for r in members for s in r.sources],
        }
        cols: dict[str, list[float]] = {"prune_ratio": [], "compute_saved": [], "loader_saved": [],
                                        "wall_clock_saved": [], **{col: [] for col, _ in ACC_COLUMNS}}
        for p in pre:
            cols["prune_ratio"].append(100.0 * float(p["prune_ratio"]))
            if whole_cost:
                cols["compute_saved"].append(100.0 * (1.0 - _cost(p) / whole_cost))
            elif p.get("compute_saved") is not None:
                cols["compute_saved"].append(100.0 * float(p["compute_saved"]))
            if whole_loaded:
                cols["loader_saved"].append(100.0 * (1.0 - _loaded(p) / whole_loaded))
            else:
                cols["loader_saved"].append(100.0 * (1.0 - _loaded(p) / (float(p["epochs"]) * float(p["num_samples"]))))
            if whole_wall:
                cols["wall_clock_saved"].append(100.0 * (1.0 - float(p["wall_seconds"]) / whole_wall))
        for r in members:
            for col, attr in ACC_COLUMNS:
                a = _acc(getattr(r, attr), acc)
                if a is not None:
                    cols[col].append(a)
        for col, vals in cols.items():
            m, s = mean_std(vals) if vals else (None, None)
            row[col] = m
            row[col + "_std"] = s
            row[col + "_n"] = len(vals)
        for col, _ in ACC_COLUMNS:
            ref = whole_acc[col]
            row[col + "_delta"] = None if row[col] is None or ref is None else row[col] - ref
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- formatting
def _num(m: float | None, s: float | None) -> str:
    if m is None:
        return DASH
    return f"{m:.1f}" if s is None else f"{m:.1f} ± {s:.1f}"


def _arrow(delta: float | None, is_whole: bool) -> str:
    if is_whole:
        return " (–)"
    if delta is None:
        return ""
    d = round(delta, 1)
    if d > 0:
        return f" (↑{d:.1f})"
    if d < 0:
        return f" (↓{-d:.1f})"
    return " (±0.0)"


def format_cell(row: dict[str, Any], col: str, arrows: bool = False) -> str:
    m = row[col]
    if m is None:
        return DASH
    text = _num(m, row[col + "_std"])
    if arrows:
        text += _arrow(row[col + "_delta"], row["is_whole"])
    if row["seeds"] > 1 and row[col + "_n"] < row["seeds"]:
        text += f" [{row[col + '_n']} of {row['seeds']}]"
    return text


def markdown(rows: list[dict[str, Any]], acc: str, skipped: list[str], supervised: bool = False) -> str:
    ft2_name = next((r["ft2_name"] for r in rows if r["ft2_name"]), None)
    acc_cols = [("knn_top1", "k-NN top-1 (%)"), ("ft_top1", "FT top-1 (%)")]
    if ft2_name:  # e.g. the CIFAR-10 block: fine-tuned on CIFAR-10 and on CIFAR-100
        acc_cols.append(("ft2_top1", f"FT {ft2_name} top-1 (%)"))
    acc_cols.append(("lp_top1", "LP top-1 (%)"))
    head = ["Method", "Prune ratio (%)", *(h for _, h in acc_cols), "Compute saved (%)", "Loader saved (%)",
            "Wall-clock saved (%)"]
    if supervised:  # supervised runs with pruning: one accuracy column
        head = ["Method", "Prune ratio (%)", "Top-1 (%)", "Compute saved (%)", "Wall-clock saved (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        name = r["method"] + (f" ({r['seeds']} seeds)" if r["seeds"] > 1 else "")
        cells = [name, format_cell(r, "prune_ratio"), *(format_cell(r, c, True) for c, _ in acc_cols),
                 format_cell(r, "compute_saved"), format_cell(r, "loader_saved"), format_cell(r, "wall_clock_saved")]
        if supervised:
            top1 = format_cell(r, "ft_top1" if r["ft_top1"] is not None else "lp_top1", True)
            cells = [name, format_cell(r, "prune_ratio"), top1, format_cell(r, "compute_saved"),
                     format_cell(r, "wall_clock_saved")]
        lines.append("| " + " | ".join(cells) + " |")
    has_whole = any(r["is_whole"] for r in rows)
    notes = [
        f"k-NN top-1: main_knn.py (k=20, T=0.07); FT/LP top-1: {acc}_acc1 of the fine-tune / linear-probe summary; "
        "arrows: difference to Whole dataset"
        + ("" if has_whole else " (no Whole-dataset run found: no arrows, savings vs each run's own full data)")
        + "; compute saved counts a forward-only sample as 1/3 of a trained one, loader saved as a full decode; "
        "wall-clock = pre-training only; mean ± std over seeds; — = not run or not finished.",
        "Sources: " + ", ".join(s for r in rows for s in r["sources"]),
    ]
    if any(r["equal_ratio"] for r in rows):
        notes.insert(1, "= D3P ratio: the arm ran at the prune ratio the D3P arm of the same seed realised "
                        "(flags from tools/match_ratio.py; Random matched to D3P: its kept count epoch by epoch).")
    if supervised:
        notes[0] = (f"Top-1: {acc}_acc1 of each supervised run's summary.json; arrows: difference to Whole dataset; "
                    "prune ratio, compute saved (a forward-only sample = 1/3 of a trained one) and wall-clock saved "
                    "(training epochs) of the same runs; mean ± std over seeds.")
    if skipped:
        notes.append("No pre-training summary yet (skipped): " + ", ".join(skipped))
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print the D3P paper's Table 1 from finished runs.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="arm folders or pre-training output folders")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of Markdown")
    p.add_argument("--acc", choices=["final", "best"], default="final",
                   help="which top-1 of the fine-tune / linear-probe summaries (default: final epoch)")
    args = p.parse_args(argv)
    missing = [d for d in args.run_dirs if not os.path.isdir(d)]
    if missing:
        p.error(f"no such folder: {', '.join(missing)}. Fix: pass arm folders (OUT/<arm>) or pre-training "
                "output folders")
    runs, skipped = [], []
    for d in args.run_dirs:
        run = load_run(d)
        (runs.append(run) if run is not None else skipped.append(d))
    if not runs:
        p.error(f"none of {', '.join(args.run_dirs)} holds a finished pre-training summary.json yet "
                "(RUN_DIR/pretrain/summary.json or RUN_DIR/summary.json). Fix: wait for a run to finish")
    rows = build_rows(runs, args.acc)
    if args.json:
        print(json.dumps({"acc": args.acc, "rows": rows, "skipped": skipped}, indent=2))
    else:
        print(markdown(rows, args.acc, skipped, supervised=all(r.supervised for r in runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
