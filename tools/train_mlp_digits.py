#!/usr/bin/env python
"""The noisy-label benchmark (docs/supervised.md): an MLP on the digits' 8x8 pixels, trained with symmetric label
noise under each pruning arm through `d3p.DataPruner`; accuracy on the clean test labels, and the share of
mislabelled samples among the samples trained and in the loss weight.

    nice -n 10 python tools/train_mlp_digits.py --out output_noisy          # 0/20/40% noise, 3 seeds, every arm
    python tools/make_table.py output_noisy/noise20/*/                      # one table again from the runs

Arms (one folder each, OUT/noise<P>/<arm>_seed<S>/ with summary.json as main_finetune.py writes it):
  none        the whole data
  random      random pruning matched epoch by epoch to the kept counts of d3p_rails of the same seed
  infobatch   r = 0.5, delta = 0.875
  d3p         D3P as published (loss_kind="reconstruction": no rails)
  d3p_rails   D3P with the classification defaults (loss_kind="classification": --d3p_max_weight,
              --d3p_min_kept, --d3p_poor_fit as documented)
Recipe: MLP 64-256-256-10 (ReLU), Adam lr 1e-3, batch 32, 30 epochs, no augmentation; the fixed digits split of
util.datasets (1,500 train / 297 test); noise from util.label_noise (exact share, seeded by the run's seed); D3P
with the demo's schedule (s=3, p=5, n=3, 32 bins: decisions at epochs 3, 8, ..., 28). One run takes ~2 s on one
core. Each decision's fit KS (d3p_fit_ks) is kept in summary.json ("fit_ks"), the data behind the fit threshold.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d3p  # noqa: E402
from util.label_noise import symmetric_label_noise  # noqa: E402
from util.run_folder import SUMMARY_FILE  # noqa: E402

ARMS = ("d3p_rails", "none", "random", "infobatch", "d3p")  # d3p_rails first: random replays its kept counts
D3P_SCHEDULE = {"d3p_start": 3, "d3p_period": 5, "d3p_window": 3, "d3p_bins": 32}
DIGITS_VAL_SIZE = 297  # util.datasets.DIGITS_VAL_SIZE: the same fixed split


def digits(noise: float, seed: int):
    """(x_train float32 [1500, 64], noisy labels, mislabelled mask, x_test, clean test labels), standardised by the
    training set's pixel statistics."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    test, train = order[:DIGITS_VAL_SIZE], order[DIGITS_VAL_SIZE:]
    x = data.data.astype(np.float32) / 16.0
    mean, std = x[train].mean(0), x[train].std(0) + 0.1
    x = (x - mean) / std
    y_train, mislabelled = symmetric_label_noise(data.target[train], 10, noise, seed)
    return (torch.from_numpy(x[train]), torch.from_numpy(y_train), mislabelled,
            torch.from_numpy(x[test]), torch.from_numpy(data.target[test].astype(np.int64)))


def run(arm: str, noise: float, seed: int, epochs: int, out_dir: str, kept_counts: list[int] | None = None,
        rails: dict | None = None) -> dict:
    x, y, mislabelled, x_test, y_test = digits(noise, seed)
    n = len(y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = "d3p" if arm.startswith("d3p") else arm
    options = dict(D3P_SCHEDULE) if method == "d3p" else {}
    if arm == "random":
        options["random_match"] = kept_counts
    if arm == "d3p_rails":
        options.update(rails or {})
    loss_kind = "classification" if arm == "d3p_rails" else "reconstruction"
    pruner = d3p.DataPruner(n, method, epochs=epochs, seed=seed, min_kept=32, loss_kind=loss_kind, **options)
    trained = weight_total = 0.0
    trained_bad = weight_bad = 0.0
    largest_weight = 1.0
    fit_warnings = 0
    fit_ks, logs = [], []
    start = time.time()
    for epoch in range(epochs):
        plan = pruner.begin_epoch(epoch)
        order = torch.tensor(list(pruner.sampler), dtype=torch.int64)
        model.train()
        for batch in order.split(32):
            loss = pruner.batch_loss(F.cross_entropy(model(x[batch]), y[batch], reduction="none"), batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        forward_only = torch.from_numpy(pruner.forward_only_indices)
        if forward_only.numel():
            with torch.no_grad():
                for batch in forward_only.split(256):
                    pruner.record(batch, F.cross_entropy(model(x[batch]), y[batch], reduction="none"))
        with warnings.catch_warnings(record=True) as caught:  # counted; the text is in the log (d3p_warning)
            warnings.simplefilter("always", d3p.D3PFitWarning)
            log = pruner.end_epoch(epoch)
        fit_warnings += sum(issubclass(w.category, d3p.D3PFitWarning) for w in caught)
        logs.append(log)
        if log.get("d3p_fit_ks") is not None:
            fit_ks.append(log["d3p_fit_ks"])
        weights = np.ones(n) if plan.weights is None else plan.weights.astype(np.float64)
        largest_weight = max(largest_weight, float(weights[plan.kept].max()))
        kept_bad = mislabelled[plan.kept]
        trained += plan.kept.size
        trained_bad += kept_bad.sum()
        weight_total += weights[plan.kept].sum()
        weight_bad += weights[plan.kept][kept_bad].sum()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean()) * 100.0
    summary = {
        "mode": "finetune", "model": "mlp_64_256_256", "data_set": "digits", "label_noise": noise, "arm": arm,
        "loss_kind": loss_kind, "final_acc1": acc, "best_acc1": acc, **pruner.summary(),
        "mislabelled_kept": trained_bad / trained, "mislabelled_weight": weight_bad / weight_total,
        "max_weight": largest_weight,
        "fit_ks": fit_ks, "fit_warnings": fit_warnings,
        "rails_acted": [lg["d3p_rails"] for lg in logs if "d3p_rails" in lg],
        "kept_counts": [int(lg["kept"]) for lg in logs], "seconds": time.time() - start,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="./output_noisy")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rails", type=json.loads, default={}, metavar="JSON",
                   help='options of the d3p_rails arm over the classification defaults, e.g. \'{"d3p_max_weight": 2}\'')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for noise in args.noise:
        folder = os.path.join(args.out, f"noise{round(100 * noise)}")
        for seed in args.seeds:
            rails = None
            for arm in args.arms:
                counts = None
                if arm == "random":
                    rails = rails or json.load(open(os.path.join(folder, f"d3p_rails_seed{seed}", SUMMARY_FILE)))
                    counts = rails["kept_counts"]
                s = run(arm, noise, seed, args.epochs, os.path.join(folder, f"{arm}_seed{seed}"), counts, args.rails)
                if arm == "d3p_rails":
                    rails = s
                ks = ", ".join(f"{v:.3f}" for v in s["fit_ks"])
                print(f"noise {noise:.0%} seed {seed} {arm:10s} acc {s['final_acc1']:5.1f}  prune "
                      f"{s['prune_ratio']:.3f}  mislabelled kept {s['mislabelled_kept']:.3f} weight "
                      f"{s['mislabelled_weight']:.3f}  max w {s['max_weight']:.1f}  KS [{ks}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
