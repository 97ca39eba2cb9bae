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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.run_folder import RATIO_MATCH_FILE, SUMMARY_FILE  # noqa: E402

EQUAL = "@d3p"  # key suffix of an arm run at the prune ratio (whole_eqc: the compute) of the D3P arm of its seed
# Row order: default-ratio arms, then the arms at D3P's ratio, then the sweep's ratios (key "<method>@<pct>"),
# each block in this method order; "No pre-training" last.
METHOD_ORDER = ["none", "random_matched", "infobatch", "seta", "d3p", "orderdp", "random", "rs2", "random_static",
                "dynunc", "d2", "whole_eqc"]
DISPLAY = {
    "none": "Whole dataset", "infobatch": "InfoBatch", "seta": "SeTa", "d3p": "D3P",
    "random_matched": "Random (matched to D3P)", "random": "Random", "rs2": "RS2", "dynunc": "Dyn-Unc",
    "d2": "D2 Pruning", "scratch": "No pre-training", "whole_eqc": "Train less", "orderdp": "OrderDP",
    "random_static": "Random static",
}
# the matched controls of an arm (same ratio / compute): random, RS2, a fixed random subset (the static selectors'
# control) and whole data trained for fewer epochs
CONTROLS = (("random", "Random"), ("rs2", "RS2"), ("random_static", "Random static"), ("whole_eqc", "Train less"))
# the accuracy a verdict reads, first one present: k-NN (deterministic given the encoder), then FT, then LP
VERDICT_COLUMNS = (("knn_top1", "k-NN"), ("ft_top1", "FT"), ("lp_top1", "LP"))
CI_LEVEL = 0.95
# flags that differ between seeds of one configuration, so they do not split a group
_PER_SEED_FLAGS = ("random_match",)
# flags solved per seed for an equal-ratio arm (tools/match_ratio.py)
_MATCHED_FLAGS = ("prune_ratio", "seta_window_scale", "orderdp_target_ratio", "d3p_target_ratio")
_CONFIG_FIELDS = ("epochs", "model", "data_set", "num_samples", "label_noise")
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
        """method; random_matched; <method>@d3p (at the D3P arm's ratio, whole_eqc@d3p: at its compute);
        <method>@<pct> (the sweep: at a given prune ratio, whole_eqc@<pct>: at that ratio's compute); scratch."""
        if self.pretrain is None:
            return "scratch"
        method = self.pretrain.get("method", "?")
        if method == "random" and (self.pretrain.get("flags") or {}).get("random_match"):
            return "random_matched"
        if self.ratio_match is None:
            return method
        if self.ratio_match.get("method") == "whole_eqc":
            method = "whole_eqc"
        if self.ratio_match.get("target_run") or "target_ratio" not in self.ratio_match:
            return method + EQUAL
        return f"{method}@{round(100 * float(self.ratio_match['target_ratio']))}"

    @property
    def equal_ratio(self) -> bool:
        return self.key == "random_matched" or "@" in self.key

    def config(self) -> tuple:
        """Everything that defines the configuration apart from the seed."""
        if self.pretrain is None:
            ft = self.finetune or self.linprobe or {}
            return (("model", ft.get("model")),)
        per_seed = _PER_SEED_FLAGS + (_MATCHED_FLAGS if self.ratio_match is not None else ())
        flags = {k: v for k, v in (self.pretrain.get("flags") or {}).items() if k not in per_seed}
        fields = tuple(f for f in _CONFIG_FIELDS if not (f == "epochs" and self.key.startswith("whole_eqc@")))
        return tuple((k, self.pretrain.get(k)) for k in fields) + tuple(sorted(flags.items()))


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
    candidates = [os.path.join(pre_dir, mode, SUMMARY_FILE)]
    if base == "pretrain":
        candidates.append(os.path.join(parent, mode, SUMMARY_FILE))
    candidates += [os.path.join(f"{pre_dir}_{mode}", SUMMARY_FILE), os.path.join(f"{pre_dir}-{mode}", SUMMARY_FILE)]
    for path in candidates:
        data = _read(path)
        if data is not None and data.get("mode", mode) == mode:
            return path, data
    for path in sorted(glob.glob(os.path.join(parent, "*", SUMMARY_FILE))):  # paired by checkpoint path
        data = _read(path)
        ckpt = (data or {}).get("checkpoint" if mode == "knn" else "finetune")
        if data and data.get("mode") == mode and ckpt and _same_dir(os.path.dirname(ckpt), pre_dir):
            return path, data
    return None


def load_run(folder: str) -> Run | None:
    """The Run of an arm folder or a pre-training folder; None (with a note) when nothing finished yet."""
    folder = os.path.normpath(folder)
    arm_pre = os.path.join(folder, "pretrain", SUMMARY_FILE)
    own = os.path.join(folder, SUMMARY_FILE)
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
        ft_path, lp_path = (os.path.join(folder, m, SUMMARY_FILE) for m in ("finetune", "linprobe"))
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
    for path in sorted(glob.glob(os.path.join(arm_dir, "finetune_*", SUMMARY_FILE))) if arm_dir else []:
        data = _read(path)
        if data and data.get("mode", "finetune") == "finetune":
            run.finetune2, run.finetune2_name = data, os.path.basename(os.path.dirname(path))[len("finetune_"):]
            run.sources.append(path)
            break
    for path in (os.path.join(folder, RATIO_MATCH_FILE), os.path.join(pre_dir, RATIO_MATCH_FILE)):
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


def split_key(key: str) -> tuple[str, str | None]:
    """'infobatch@d3p' -> ('infobatch', 'd3p'); 'rs2@30' -> ('rs2', '30'); 'random_matched' -> ('random', 'd3p')."""
    if key == "random_matched":
        return "random", "d3p"
    base, _, tag = key.partition("@")
    return base, (tag or None)


def _sort_key(key: str) -> tuple:
    """Default-ratio block, then D3P's ratio, then the sweep's ratios in increasing order; scratch last."""
    if key == "scratch":
        return (99.0, 0, key)
    base, tag = split_key(key)
    block = 0.0 if tag is None else (1.0 if tag == "d3p" else 2.0 + float(tag) / 100)
    name = "random_matched" if key == "random_matched" else base
    return (block, METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), key)


def _epochs_text(members: list[Run]) -> str:
    """'73 of 80 epochs' (or '72-74 of 80') for the Train-less rows: their epochs and the full run's."""
    epochs = sorted({int(r.pretrain["epochs"]) for r in members if r.pretrain})
    full = sorted({int(r.ratio_match.get("full_epochs", 0)) for r in members if r.ratio_match} - {0})
    span = f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
    return span + (f" of {full[0]} epochs" if len(full) == 1 else " epochs")


def _label(key: str, members: list[Run]) -> str:
    base, tag = split_key(key)
    if key == "random_matched":
        return DISPLAY[key]
    if base == "whole_eqc":
        what = "D3P's compute" if tag == "d3p" else f"the compute of {tag}% pruned"
        return f"Train less: Whole, {_epochs_text(members)} (= {what})"
    name = DISPLAY.get(base, base)
    if tag == "d3p":
        return name + " (= D3P ratio)"
    if tag is not None and any((r.ratio_match or {}).get("target") == "compute_saved" for r in members):
        return f"{name} ({tag}% compute saved)"  # D3P's sweep arm: its forward-only passes cost compute too
    return name if tag is None else f"{name} ({tag}% pruned)"


def paired_difference(arm: dict[Any, float], control: dict[Any, float], level: float = CI_LEVEL) -> dict[str, Any] | None:
    """arm - control, paired by seed: {seed: value} each -> n, mean, std, the t-interval over seeds, significant.

    Only seeds present in both count; None when there are none. The interval is mean +- t_{(1+level)/2, n-1} std /
    sqrt(n) (Student's t, the paired t-test's interval); with one seed there is no interval (lo = hi = None).
    significant: the interval excludes 0.
    """
    seeds = sorted(set(arm) & set(control), key=str)
    if not seeds:
        return None
    diffs = [arm[s] - control[s] for s in seeds]
    mean, std = mean_std(diffs)
    out: dict[str, Any] = {"n": len(diffs), "mean": mean, "std": std, "lo": None, "hi": None, "significant": False,
                           "seeds": seeds}
    if len(diffs) >= 2:
        from scipy.stats import t as student_t

        half = float(student_t.ppf(0.5 + level / 2, len(diffs) - 1)) * std / math.sqrt(len(diffs))
        out["lo"], out["hi"] = mean - half, mean + half
        out["significant"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def _add_paired(rows: list[dict[str, Any]]) -> None:
    """row['paired'][col][control] = paired_difference against Whole and against the matched controls (random,
    RS2, Train less) of the row's own ratio (D3P's, or the sweep's pct), by seed."""
    by_key = {r["key"]: r for r in rows}
    whole = next((r for r in rows if r["is_whole"]), None)
    for row in rows:
        base, tag = split_key(row["key"])
        if row["key"] == "d3p":  # D3P's own controls: the arms at its ratio
            tag = "d3p"
        refs: list[tuple[str, dict[str, Any]]] = []
        if whole is not None and not row["is_whole"]:
            refs.append(("Whole", whole))
        if tag is not None:
            for ctl, name in CONTROLS:
                key = "random_matched" if (ctl == "random" and tag == "d3p") else f"{ctl}@{tag}"
                if key in by_key and key != row["key"]:
                    refs.append((name, by_key[key]))
        row["paired"] = {}
        for col, _ in ACC_COLUMNS:
            cells = {}
            for name, ref in refs:
                diff = paired_difference(row["per_seed"][col], ref["per_seed"][col])
                if diff is not None:
                    cells[name] = {**diff, "control": ref["key"]}
            row["paired"][col] = cells


def build_rows(runs: list[Run], acc: str = "final") -> list[dict[str, Any]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.key, run.config()), []).append(run)
    by_key: dict[str, list[tuple]] = {}
    for gk in groups:
        by_key.setdefault(gk[0], []).append(gk[1])

    def label(key: str, config: tuple, members: list[Run]) -> str:
        name = _label(key, members)
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
    for gk in sorted(groups, key=lambda gk: (_sort_key(gk[0]), str(gk[1]))):
        members = sorted(groups[gk], key=lambda r: ((r.pretrain or {}).get("seed", 0), r.folder))
        is_whole = gk == whole_gk
        pre = [r.pretrain for r in members if r.pretrain is not None]
        row: dict[str, Any] = {
            "key": gk[0], "method": label(gk[0], gk[1], members), "seeds": len(members), "is_whole": is_whole,
            "equal_ratio": members[0].equal_ratio,
            "ft2_name": next((r.finetune2_name for r in members if r.finetune2_name), None),
            "seed_list": [(r.pretrain or {}).get("seed") for r in members],
            "folders": [r.folder for r in members], "sources": [s for r in members for s in r.sources],
        }
        cols: dict[str, list[float]] = {"prune_ratio": [], "compute_saved": [], "loader_saved": [],
                                        "wall_clock_saved": [], **{col: [] for col, _ in ACC_COLUMNS},
                                        **{col: [] for col, _ in NOISE_COLUMNS}}
        for p in pre:
            cols["prune_ratio"].append(100.0 * float(p["prune_ratio"]))
            for col, _ in NOISE_COLUMNS:  # supervised runs with label noise (tools/train_mlp_digits.py)
                if p.get(col) is not None:
                    cols[col].append(100.0 * float(p[col]))
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
        per_seed: dict[str, dict[Any, float]] = {col: {} for col, _ in ACC_COLUMNS}
        for r in members:
            for col, attr in ACC_COLUMNS:
                a = _acc(getattr(r, attr), acc)
                if a is not None:
                    cols[col].append(a)
                    per_seed[col][(r.pretrain or {}).get("seed", r.folder)] = a
        row["per_seed"] = per_seed
        for col, vals in cols.items():
            m, s = mean_std(vals) if vals else (None, None)
            row[col] = m
            row[col + "_std"] = s
            row[col + "_n"] = len(vals)
        for col, _ in ACC_COLUMNS:
            ref = whole_acc[col]
            row[col + "_delta"] = None if row[col] is None or ref is None else row[col] - ref
        rows.append(row)
    _add_paired(rows)
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


def format_diff(diff: dict[str, Any], seeds: int) -> str:
    """'-1.2 [-2.3, -0.1]*' (mean [95% t-interval], * = excludes 0); '(n=3)' when fewer seeds pair than the row has."""
    text = f"{diff['mean']:+.1f}"
    if diff["lo"] is not None:
        text += f" [{diff['lo']:+.1f}, {diff['hi']:+.1f}]" + ("*" if diff["significant"] else "")
    if diff["n"] < seeds or diff["n"] == 1:
        text += f" (n={diff['n']})"
    return text


# supervised runs with noisy labels: the share of mislabelled samples among the samples trained (over all epochs)
# and in the loss weight (summary.json fields of tools/train_mlp_digits.py)
NOISE_COLUMNS = (("mislabelled_kept", "Mislabelled in kept (%)"), ("mislabelled_weight", "Mislabelled in weight (%)"))
ACC_TITLES = {"knn_top1": "k-NN top-1 (%)", "ft_top1": "FT top-1 (%)", "ft2_top1": "FT {} top-1 (%)",
              "lp_top1": "LP top-1 (%)"}


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per accuracy column: mean ± std, then the paired difference to Whole and to each matched
    control, by seed, with its t-interval. Empty when no row has a control."""
    blocks = []
    ft2_name = next((r["ft2_name"] for r in rows if r["ft2_name"]), None)
    for col, _ in ACC_COLUMNS:
        present = [r for r in rows if r.get("paired", {}).get(col)]
        if not present:
            continue
        controls = [name for name in ("Whole", *(n for _, n in CONTROLS))
                    if any(name in r["paired"][col] for r in present)]
        title = ACC_TITLES[col].format(ft2_name)
        head = ["Method", title, *(f"vs {c}" for c in controls)]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
        for r in present:
            cells = [r["method"] + (f" ({r['seeds']} seeds)" if r["seeds"] > 1 else ""), format_cell(r, col)]
            cells += [format_diff(r["paired"][col][c], r[col + "_n"]) if c in r["paired"][col] else DASH
                      for c in controls]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    if not blocks:
        return ""
    note = (f"Paired differences (points): arm - control over the seeds both ran, mean [{CI_LEVEL:.0%} t-interval "
            "over seeds], * where the interval excludes 0. Controls: Whole; and at the arm's own ratio (D3P's, or "
            "the sweep's) Random (matched to D3P / at that ratio), RS2, Random static (a fixed random subset), and "
            "Train less (whole data, fewer epochs, same compute).")
    return "\n\n".join(blocks) + "\n\n" + note


def markdown(rows: list[dict[str, Any]], acc: str, skipped: list[str], supervised: bool = False) -> str:
    ft2_name = next((r["ft2_name"] for r in rows if r["ft2_name"]), None)
    acc_cols = [("knn_top1", "k-NN top-1 (%)"), ("ft_top1", "FT top-1 (%)")]
    if ft2_name:  # e.g. the CIFAR-10 block: fine-tuned on CIFAR-10 and on CIFAR-100
        acc_cols.append(("ft2_top1", f"FT {ft2_name} top-1 (%)"))
    acc_cols.append(("lp_top1", "LP top-1 (%)"))
    noise_cols = [(c, t) for c, t in NOISE_COLUMNS if any(r.get(c) is not None for r in rows)] if supervised else []
    head = ["Method", "Prune ratio (%)", *(h for _, h in acc_cols), "Compute saved (%)", "Loader saved (%)",
            "Wall-clock saved (%)"]
    if supervised:  # supervised runs with pruning: one accuracy column
        head = ["Method", "Prune ratio (%)", "Top-1 (%)", "Compute saved (%)", "Wall-clock saved (%)"]
        head += [title for _, title in noise_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        name = r["method"] + (f" ({r['seeds']} seeds)" if r["seeds"] > 1 else "")
        cells = [name, format_cell(r, "prune_ratio"), *(format_cell(r, c, True) for c, _ in acc_cols),
                 format_cell(r, "compute_saved"), format_cell(r, "loader_saved"), format_cell(r, "wall_clock_saved")]
        if supervised:
            top1 = format_cell(r, "ft_top1" if r["ft_top1"] is not None else "lp_top1", True)
            cells = [name, format_cell(r, "prune_ratio"), top1, format_cell(r, "compute_saved"),
                     format_cell(r, "wall_clock_saved")]
            cells += [format_cell(r, col) for col, _ in noise_cols]
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
    if any(split_key(r["key"])[1] not in (None, "d3p") for r in rows):
        notes.insert(1, "(P% pruned): the sweep; the arm ran at prune ratio P% (flags from tools/match_ratio.py; "
                        "InfoBatch/SeTa land near it, see the Prune ratio column); (P% compute saved): D3P's sweep "
                        "arm, which prunes more so that its forward-only passes included it spends the column's "
                        "compute.")
    if any(split_key(r["key"])[1] == "d3p" for r in rows):
        notes.insert(1, "= D3P ratio: the arm ran at the prune ratio the D3P arm of the same seed realised "
                        "(flags from tools/match_ratio.py; Random matched to D3P: its kept count epoch by epoch).")
    if any(split_key(r["key"])[0] == "whole_eqc" for r in rows):
        notes.insert(1, "Train less: the whole data for fewer epochs (learning-rate warm-up and cosine compressed "
                        "to them), the epochs chosen so that its compute equals that of the arm it controls "
                        "(tools/match_ratio.py whole_eqc): D3P's of the same seed, or the sweep's ratio.")
    if supervised:
        notes[0] = (f"Top-1: {acc}_acc1 of each supervised run's summary.json; arrows: difference to Whole dataset; "
                    "prune ratio, compute saved (a forward-only sample = 1/3 of a trained one) and wall-clock saved "
                    "(training epochs) of the same runs; mean ± std over seeds.")
        if noise_cols:
            notes[0] += (" Mislabelled in kept: share of mislabelled samples among all samples trained over the run "
                         "(epoch by epoch); in weight: their share of the loss weight (D3P's up-weights, InfoBatch's "
                         "1/(1-r)); with whole data both equal the noise rate. Top-1 on clean test labels.")
    if skipped:
        notes.append("No pre-training summary yet (skipped): " + ", ".join(skipped))
    paired = "" if supervised else paired_markdown(rows)
    return "\n".join(lines) + "\n\n" + (paired + "\n\n" if paired else "") + "\n".join(notes)


def _ratio_text(row: dict[str, Any]) -> str:
    """The prune ratio a row ran at: the sweep's P%, else its realised mean ratio (D3P's, or an arm at it)."""
    _, tag = split_key(row["key"])
    if tag not in (None, "d3p"):
        return f"{tag}%"
    return f"{row['prune_ratio']:.1f}%" if row["prune_ratio"] is not None else "?%"


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Does pruning pay, per method: against Train less (the whole data for fewer epochs, same compute) at each
    ratio the method ran, paired by seed (`_add_paired`). It pays at a ratio where the interval lies above 0.

    Returns one record per method (Whole and Train less excluded): method, text, column, and pays: [(ratio text,
    paired difference)] (all the ratios where it pays; [] otherwise), compared: [(ratio text, difference)].
    text: "pays at X% (beats train less by +Y [lo, hi] k-NN points)" (several ratios joined by '; '), or
    "does not pay here (vs train less: ...)", or "not compared with train less here" without such a control.
    """
    bases: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        base, _ = split_key(row["key"])
        if row["is_whole"] or base in ("whole_eqc", "scratch", "none"):
            continue
        bases.setdefault(base, []).append(row)
    out = []
    for base in sorted(bases, key=lambda b: (METHOD_ORDER.index(b) if b in METHOD_ORDER else 99, b)):
        members = bases[base]
        col, short = next(((c, n) for c, n in VERDICT_COLUMNS
                            if any("Train less" in r.get("paired", {}).get(c, {}) for r in members)), (None, None))
        record: dict[str, Any] = {"method": DISPLAY.get(base, base), "key": base, "column": col, "pays": [],
                                  "compared": []}
        if col is None:
            record["text"] = "not compared with train less here (no Train-less run at its ratio)"
            out.append(record)
            continue
        for r in members:
            diff = r["paired"].get(col, {}).get("Train less")
            if diff is not None:
                record["compared"].append((_ratio_text(r), diff))
        record["pays"] = [(x, d) for x, d in record["compared"] if d["significant"] and d["mean"] > 0]
        if record["pays"]:
            record["text"] = "; ".join(f"pays at {x} (beats train less by {format_diff(d, d['n'])} {short} points)"
                                       for x, d in record["pays"])
        else:
            record["text"] = "does not pay here (vs train less: " + "; ".join(
                f"{format_diff(d, d['n'])} at {x}" for x, d in record["compared"]) + f" {short} points)"
        out.append(record)
    return out


def verdict_text(rows: list[dict[str, Any]]) -> str:
    """The verdict lines (`verdicts`) under a one-line heading; '' when no method ran."""
    lines = [f"- {v['method']}: {v['text']}" for v in verdicts(rows)]
    if not lines:
        return ""
    return ("Does pruning pay? Each method against Train less (whole data, fewer epochs, the same compute), paired "
            f"by seed, mean [{CI_LEVEL:.0%} t-interval]; it pays where the interval lies above 0:\n" + "\n".join(lines))


def plot_figure(rows: list[dict[str, Any]], path: str, col: str = "knn_top1") -> None:
    """PNG: `col` (k-NN top-1) against compute saved, one point per row with error bars (std over seeds); the
    sweep's methods as curves through their ratios (and D3P's ratio); Whole + the Train-less arms as the "train
    less" frontier (dashed). Raises ValueError when no row has both numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r[col] is not None and r["compute_saved"] is not None]
    if not points:
        raise ValueError(f"no row has both {col} and compute saved: nothing to plot")
    series: dict[str, list[dict[str, Any]]] = {}
    for r in points:
        base, _ = split_key(r["key"])
        series.setdefault("none" if r["is_whole"] else base, []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {"d3p": "*", "random": "o", "rs2": "s", "infobatch": "^", "seta": "v", "dynunc": "D", "d2": "P",
               "scratch": "x", "orderdp": "h", "random_static": "d"}
    frontier = sorted(series.pop("none", []) + series.pop("whole_eqc", []), key=lambda r: r["compute_saved"])
    if frontier:
        ax.errorbar([r["compute_saved"] for r in frontier], [r[col] for r in frontier],
                    yerr=[r[col + "_std"] or 0.0 for r in frontier], xerr=[r["compute_saved_std"] or 0.0 for r in frontier],
                    color="black", linestyle="--", marker="o", markerfacecolor="white", capsize=3,
                    label="Whole / train less (fewer epochs)", zorder=3)
    for i, (base, members) in enumerate(sorted(series.items(), key=lambda kv: METHOD_ORDER.index(kv[0])
                                               if kv[0] in METHOD_ORDER else 99)):
        members = sorted(members, key=lambda r: r["compute_saved"])
        name = DISPLAY.get(base, base)
        ax.errorbar([r["compute_saved"] for r in members], [r[col] for r in members],
                    yerr=[r[col + "_std"] or 0.0 for r in members], xerr=[r["compute_saved_std"] or 0.0 for r in members],
                    color=colors[i % len(colors)], marker=markers.get(base, "o"), markersize=12 if base == "d3p" else 6,
                    linestyle="-" if len(members) > 1 else "none", capsize=3, label=name, zorder=4)
    seeds = sorted({r["seeds"] for r in points})
    ax.set_xlabel("compute saved vs Whole (%)")
    ax.set_ylabel(ACC_TITLES[col].format("") + ", mean ± std over seeds")
    ax.set_title(f"Accuracy against compute ({'/'.join(map(str, seeds))} seed{'' if seeds == [1] else 's'} per point)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print the D3P paper's Table 1 from finished runs.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="arm folders or pre-training output folders")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of Markdown")
    p.add_argument("--plot", default=None, metavar="FIG.png",
                   help="also draw k-NN top-1 against compute saved (sweep methods as curves, Train less as the "
                        "frontier)")
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
    if args.plot:
        try:
            plot_figure(rows, args.plot)
        except ValueError as exc:
            print(f"warning: --plot {args.plot}: {exc}", file=sys.stderr)
        else:
            print(f"figure: {args.plot}", file=sys.stderr)
    supervised = all(r.supervised for r in runs)
    if args.json:
        print(json.dumps({"acc": args.acc, "rows": rows, "skipped": skipped,
                          "verdicts": [] if supervised else verdicts(rows)}, indent=2))
    else:
        print(markdown(rows, args.acc, skipped, supervised=supervised))
        verdict = "" if supervised else verdict_text(rows)
        if verdict:
            print("\n" + verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
