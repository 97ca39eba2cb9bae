"""Cost of a D3P decision, of the sampler rebuild, and of the per-sample D3P state.

    python benchmarks/bench_d3p.py                           # N = 50,000, 1,281,167, 14,197,122
    python benchmarks/bench_d3p.py --sizes 50000 --repeats 5

Synthetic loss windows (n = 3 recording epochs) with persistent per-sample difficulty (a
log-normal base per sample times small per-epoch noise), the case in which D3P prunes ~20-30%,
so every stage (support, trimming, up-weighting) does real work.

Columns:
  decide_s        best-of-`repeats` wall time of d3p.stats.decide (CLD, ideal density, support,
                  histogram matching).
  sampler_s       PrunedDistributedSampler(world_size 64, rank 0): set_indices(kept) +
                  set_epoch(e) + len() (no list(iter(...))), best of `repeats`.
  state_B/sample  bytes per sample of the state D3P keeps between epochs, summed from the
                  nbytes of the actual arrays: loss window (n x float32), per-epoch loss sum
                  (float64) and count (int32), pruned (bool), weights (float32), and the
                  controller's trained-epoch counts (int32, for d3p.export --counts).
  peak_B/sample   tracemalloc peak of one decide() call (its extra allocations: CLD, masks,
                  bin ids, the grouping argsort, the returned arrays) per sample; a separate
                  run, so tracing overhead does not pollute decide_s.
  pruned          prune ratio of the decision (sanity: the work was real).
This is a measurement, not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d3p.stats import decide  # noqa: E402  (needs the repository on sys.path as a script)

WORLD_SIZE = 64
N_EPOCHS = 3


def synthetic_window(num_samples: int, seed: int = 0) -> np.ndarray:
    """float32 (3, N) losses: base_i * mu_t * (1 + 0.05 * noise), base ~ LogNormal(0, 0.25)."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(0.0, 0.25, num_samples).astype(np.float32)
    mu = np.array([0.80, 0.75, 0.72], dtype=np.float32)
    w = rng.standard_normal((N_EPOCHS, num_samples), dtype=np.float32)
    w *= np.float32(0.05)
    w += np.float32(1.0)
    w *= mu[:, None]
    w *= base[None, :]
    return w


def state_bytes_per_sample(window: np.ndarray, decision) -> float:
    """Bytes per sample of the per-sample state, from the nbytes of arrays of the real dtypes."""
    N = window.shape[1]
    loss_sum = np.zeros(N, dtype=np.float64)  # the epoch being recorded (EpochLosses.loss_sum)
    count = np.zeros(N, dtype=np.int32)  # EpochLosses.count
    trained_counts = np.zeros(N, dtype=np.int32)  # DataPruner.trained_counts
    arrays = [window, loss_sum, count, decision.pruned, decision.weights, trained_counts]
    return sum(a.nbytes for a in arrays) / N


def time_sampler(num_samples: int, kept: np.ndarray, repeats: int) -> float | None:
    try:
        from d3p.sampler import PrunedDistributedSampler
    except ImportError as err:  # the lead's module; report instead of failing the whole table
        print(f"# sampler unavailable: {err}", file=sys.stderr)
        return None
    sampler = PrunedDistributedSampler(num_samples, num_replicas=WORLD_SIZE, rank=0, seed=0, shuffle=True)
    best = float("inf")
    for epoch in range(1, repeats + 1):
        t0 = time.perf_counter()
        sampler.set_indices(kept)
        sampler.set_epoch(epoch)
        length = len(sampler)
        best = min(best, time.perf_counter() - t0)
    assert length == -(-kept.size // WORLD_SIZE)  # sanity of the measured object, not a timing
    return best


def bench(num_samples: int, repeats: int) -> dict:
    window = synthetic_window(num_samples)
    best = float("inf")
    decision = None
    for r in range(repeats):
        t0 = time.perf_counter()
        decision = decide(window, bins=128, rng=r)
        best = min(best, time.perf_counter() - t0)
    del decision
    tracemalloc.start()
    decision = decide(window, bins=128, rng=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    sampler_s = time_sampler(num_samples, decision.kept_indices(), repeats)
    return {
        "N": num_samples,
        "decide_s": best,
        "sampler_s": sampler_s,
        "state_B": state_bytes_per_sample(window, decision),
        "peak_B": peak / num_samples,
        "pruned": decision.prune_ratio,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 1_281_167, 14_197_122])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    header = f"{'N':>12} {'decide_s':>9} {'sampler_s':>10} {'state_B/sample':>15} {'peak_B/sample':>14} {'pruned':>7}"
    print(f"# n={N_EPOCHS} epochs, bins=128, world_size={WORLD_SIZE} rank 0, numpy {np.__version__}")
    print(header)
    for n in args.sizes:
        r = bench(n, args.repeats)
        sampler = f"{r['sampler_s']:10.4f}" if r["sampler_s"] is not None else f"{'n/a':>10}"
        print(f"{r['N']:>12,} {r['decide_s']:9.3f} {sampler} {r['state_B']:15.1f} {r['peak_B']:14.1f} "
              f"{r['pruned']:7.1%}", flush=True)


if __name__ == "__main__":
    main()
