"""Run under torchrun by tests/library/test_d3p_method.py: every rank records its sampler share of
synthetic losses, reduces them once per epoch, and lets D3P decide. Writes rank{r}.npz."""
import os
import sys

import numpy as np
import torch.distributed as dist

from d3p.distributed import RankDivergenceError, check_ranks_agree
from d3p.integration import DataPruner
from d3p.methods.d3p import D3P
from d3p.schedule import D3PSchedule

import torch


def synthetic_loss(index: np.ndarray, epoch: int) -> np.ndarray:
    """Persistent per-sample difficulty plus small epoch noise (deterministic per index and epoch)."""
    base = np.exp(0.4 * np.sin(index * 12.9898) * 3.0)
    noise = 0.03 * np.cos(index * 78.233 + epoch * 1.7)
    return base * (1 + noise)


_reduced_elements: list[int] = []  # elements all-reduced, one entry per call


def _counting_all_reduce(tensor, *args, **kwargs):
    _reduced_elements.append(tensor.numel())
    return _real_all_reduce(tensor, *args, **kwargs)


_real_all_reduce = dist.all_reduce


def main(out_dir: str, diverge: bool) -> int:
    dist.init_process_group("gloo")
    dist.all_reduce = _counting_all_reduce  # test harness only: measure what the controller reduces
    rank = dist.get_rank()
    n = 3001
    sched = D3PSchedule(start=2, period=2, window=2, epochs=4)
    seed = 7 + (rank if diverge else 0)
    strategy = D3P(n, sched, bins=32, seed=seed)
    controller = DataPruner(n, strategy, seed=0)
    try:
        reduced_per_epoch = []
        for epoch in range(4):
            before = len(_reduced_elements)
            plan = controller.begin_epoch(epoch)
            if plan.record_losses:
                idx = np.fromiter(iter(controller.sampler), dtype=np.int64)
                controller.batch_loss(torch.from_numpy(synthetic_loss(idx, epoch)), torch.from_numpy(idx))
                if controller.forward_only_indices.size:
                    idx = np.fromiter(iter(controller.forward_sampler), dtype=np.int64)
                    controller.record(torch.from_numpy(idx), torch.from_numpy(synthetic_loss(idx, epoch)))
            controller.end_epoch(epoch)
            reduced_per_epoch.append(_reduced_elements[before:])
        plan = controller.begin_epoch(4 - 1)
    except RankDivergenceError as exc:
        print(f"rank {rank}: {exc}", flush=True)
        return 3
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), pruned=strategy.pruned, weights=strategy.weights,
             fingerprint=np.array([check_ranks_agree(plan, 99)]),
             reduced=np.array([sum(r) for r in reduced_per_epoch]), calls=np.array([len(r) for r in reduced_per_epoch]))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], "--diverge" in sys.argv))
