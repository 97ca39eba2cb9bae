"""A user's own supervised loop, DataPruner at its defaults, noisy labels: does the default lose against Whole?

    python benchmarks/bench_safe_default.py [--seeds 0 1 2] [--epochs 30] [--out RESULT.json]

Issue 29 item 6: 8,000 training samples of a 10-class Gaussian mixture (32 dimensions), 20% symmetric label noise,
an MLP, SGD, batch 100, the five-line loop of docs/library.md with `d3p.per_sample_cross_entropy`. Arms:
  whole       method "none" (every sample, every epoch)
  default     DataPruner(N, "d3p", epochs=E, loss_fn=...): no loss_kind, so the rails are on
  published   the same with loss_kind="reconstruction": D3P as published (what the default was before)
  keep_all    (--keep_all) the default with d3p_poor_fit="keep_all": a poorly fitting decision prunes nothing
  random      method "random" at the default arm's kept counts (random_match)
Prints one JSON line per run and a summary: the clean test accuracy of each arm, mean over the seeds, and the
default arm's loss against Whole (acceptance: at most 3 points).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import d3p  # noqa: E402

N_TRAIN, N_TEST, DIM, CLASSES, NOISE, BATCH = 8000, 2000, 32, 10, 0.2, 100


def mixture(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """A 10-class Gaussian mixture; the training labels carry 20% symmetric noise (never the true class)."""
    g = np.random.default_rng(1000 + seed)
    centres = g.normal(0.0, 1.0, (CLASSES, DIM)) * 1.1
    y = g.integers(0, CLASSES, N_TRAIN + N_TEST)
    x = centres[y] + g.normal(0.0, 1.0, (y.size, DIM))
    noisy = y[:N_TRAIN].copy()
    flip = g.random(N_TRAIN) < NOISE
    noisy[flip] = (noisy[flip] + g.integers(1, CLASSES, int(flip.sum()))) % CLASSES
    as_x = torch.tensor(x, dtype=torch.float32)
    return (TensorDataset(as_x[:N_TRAIN], torch.tensor(noisy)),
            TensorDataset(as_x[N_TRAIN:], torch.tensor(y[N_TRAIN:])))


def run(arm: str, seed: int, epochs: int, match: list[int] | None = None) -> dict:
    train_set, test_set = mixture(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Linear(128, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = d3p.per_sample_cross_entropy
    if arm == "whole":
        pruner = d3p.DataPruner(N_TRAIN, "none", loss_fn=loss_fn, seed=seed)
    elif arm == "default":
        pruner = d3p.DataPruner(N_TRAIN, "d3p", epochs=epochs, loss_fn=loss_fn, seed=seed)
    elif arm == "keep_all":  # the default with a poorly fitting decision pruning nothing (--d3p_poor_fit keep_all)
        pruner = d3p.DataPruner(N_TRAIN, "d3p", epochs=epochs, loss_fn=loss_fn, seed=seed, d3p_poor_fit="keep_all")
    elif arm == "published":
        pruner = d3p.DataPruner(N_TRAIN, "d3p", epochs=epochs, loss_fn=loss_fn, seed=seed, loss_kind="reconstruction")
    else:
        pruner = d3p.DataPruner(N_TRAIN, "random", epochs=epochs, loss_fn=loss_fn, seed=seed, random_match=match)
    loader = DataLoader(train_set, batch_size=BATCH, shuffle=True)
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", d3p.D3PFitWarning)  # the published arm warns; this script reads the numbers
        for epoch in range(epochs):
            for x, y in pruner.epoch(loader, epoch, model):
                loss = pruner.loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        x, y = test_set.tensors
        accuracy = 100.0 * float((model(x).argmax(1) == y).float().mean())
    summary = pruner.summary()
    weights = getattr(pruner.strategy, "weights", None)
    return {"arm": arm, "seed": seed, "test_acc1": round(accuracy, 2), "prune_ratio": round(summary["prune_ratio"], 4),
            "kept": [e["kept"] for e in pruner.ledger.epochs],
            "max_weight": None if weights is None else float(np.max(weights)), "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--keep_all", action="store_true", help="also run the keep_all arm")
    args = p.parse_args(argv)
    runs = []
    for seed in args.seeds:
        for arm in ("whole", "default", "published") + (("keep_all",) if args.keep_all else ()):
            runs.append(run(arm, seed, args.epochs))
            print(json.dumps(runs[-1]), flush=True)
        default_kept = next(r["kept"] for r in runs if r["arm"] == "default" and r["seed"] == seed)
        runs.append(run("random", seed, args.epochs, match=default_kept))
        print(json.dumps(runs[-1]), flush=True)
    mean = {arm: round(float(np.mean([r["test_acc1"] for r in runs if r["arm"] == arm])), 2)
            for arm in ("whole", "default", "published", "random", "keep_all") if any(r["arm"] == arm for r in runs)}
    result = {"mean_test_acc1": mean, "default_minus_whole": round(mean["default"] - mean["whole"], 2),
              "seeds": args.seeds, "epochs": args.epochs, "runs": runs}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
