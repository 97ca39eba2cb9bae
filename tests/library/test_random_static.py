"""random_static: one uniform random subset fixed at the static selectors' warm-up epoch (their control)."""
import io

import numpy as np
import torch

import d3p
from d3p.methods.random_static import RandomStatic
from d3p.registry import get_method
from d3p.strategy import EpochLosses


def _run(seed=0, losses_scale=1.0, n=500, warmup=3, epochs=8, ratio=0.7):
    s = d3p.DataPruner(n, "random_static", epochs=epochs, seed=seed, prune_ratio=ratio,
                       static_warmup_epochs=warmup).strategy
    kept = []
    for epoch in range(epochs):
        plan = s.plan_epoch(epoch)
        kept.append(plan.kept)
        losses = EpochLosses(losses_scale * np.random.default_rng(epoch).random(n), np.ones(n, dtype=np.int32))
        s.end_epoch(epoch, losses if plan.record_losses else None)
    return s, kept


def test_full_warmup_then_one_fixed_subset_of_the_ratio():
    s, kept = _run()
    assert get_method("random_static").kind == "static"  # the static methods' schedule and export
    assert all(k.size == 500 for k in kept[:3])
    assert kept[3].size == round(0.3 * 500) and all(np.array_equal(k, kept[3]) for k in kept[3:])
    assert np.array_equal(s.subset, kept[3])


def test_the_subset_ignores_the_losses_and_follows_the_seed():
    _, a = _run(seed=0)
    _, b = _run(seed=0, losses_scale=-3.0)  # other losses: the same subset (no selection by loss)
    _, c = _run(seed=1)
    assert np.array_equal(a[-1], b[-1]) and not np.array_equal(a[-1], c[-1])


def test_uniform_inclusion_over_seeds():
    n, seeds = 60, 600
    counts = np.zeros(n)
    for seed in range(seeds):
        s = RandomStatic(n, 1, 0.5, seed)
        s.end_epoch(0, EpochLosses(np.arange(n, dtype=float), np.ones(n, dtype=np.int32)))
        counts[s.subset] += 1
    # each sample kept with probability 1/2: 600 draws, 4.5 sigma
    assert np.abs(counts / seeds - 0.5).max() <= 4.5 * np.sqrt(0.25 / seeds)


def test_state_round_trip():
    s, kept = _run(epochs=5)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = RandomStatic(500, 3, 0.7, 0)
    t.load_state_dict(torch.load(buf, weights_only=False))
    assert np.array_equal(t.plan_epoch(6).kept, kept[-1])
