"""The two collectives pruning needs: one reduction of per-sample losses per epoch, and the
rank-consistency guard at every plan. Both go through d3p.collectives' wrappers (device checks, strict mode)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from d3p.strategy import EpochLosses, EpochPlan
from d3p.collectives import all_gather, all_reduce, is_dist, to_collective


class RankDivergenceError(RuntimeError):
    pass


def reduce_epoch_losses(loss_sum: np.ndarray, count: np.ndarray) -> EpochLosses:
    """Sum per-sample loss sums and counts over ranks: O(N) bytes, once per epoch."""
    if not is_dist():
        return EpochLosses(loss_sum=loss_sum, count=count)
    s = all_reduce(to_collective(torch.from_numpy(loss_sum)))
    c = all_reduce(to_collective(torch.from_numpy(count)))
    return EpochLosses(loss_sum=s.cpu().numpy(), count=c.cpu().numpy())


def plan_fingerprint(plan: EpochPlan) -> int:
    """A 63-bit hash of what the plan trains on and how it weighs it."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(plan.kept, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(plan.forward_only, dtype=np.int64).tobytes())
    if plan.weights is not None:
        h.update(np.ascontiguousarray(plan.weights, dtype=np.float32).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_ranks_agree(plan: EpochPlan, epoch: int) -> int:
    """All-gather the plan's fingerprint; raise if any rank would train on other data."""
    fp = plan_fingerprint(plan)
    if not is_dist():
        return fp
    prints = [int(x.item()) for x in all_gather(to_collective(torch.tensor([fp], dtype=torch.int64)))]
    if len(set(prints)) != 1:
        raise RankDivergenceError(
            f"epoch {epoch}: ranks disagree on the pruning plan (fingerprints {prints}). Training stops rather "
            "than train on diverged data. Likely causes: different --seed or flags per rank, or a pruning state "
            "restored on some ranks only. Fix: relaunch all ranks with identical flags from one checkpoint"
        )
    return fp
