"""Run under torchrun (2 ranks, gloo) by tests/training/test_stop.py: util.stop.StopAgreement over several phases.

    python -m torch.distributed.run --nproc_per_node 2 tests/stop_agreement_worker.py OUT_DIR

Each case is a phase of `boundaries` boundaries in which this rank's flag is raised from boundary `raise_at[rank]`
on (None: never). Every rank writes OUT_DIR/rank<R>.json: per case, the boundary at which at_boundary returned
True (None: never), how many boundaries the phase ran, and what end() returned (a file: the ranks' stdout
lines interleave under torchrun).
"""
import json
import os
import sys
import time


import torch.distributed as dist

from util.stop import StopAgreement

# name: (boundaries in the phase, the boundary from which rank 0's / rank 1's flag is up, lag)
CASES = {
    "rank1_at_0": (10, (None, 0), 2),
    "rank1_at_1": (10, (None, 1), 2),
    "rank1_at_3": (10, (None, 3), 2),
    "rank1_at_6": (10, (None, 6), 2),
    "both_at_4_and_2": (10, (4, 2), 2),
    "no_flag": (10, (None, None), 2),
    "raised_at_the_last_boundary": (5, (None, 4), 2),
    "one_boundary_phase": (1, (0, None), 2),
    "empty_phase": (0, (0, 0), 2),
    "lag1_rank1_at_3": (10, (None, 3), 1),
}


class Flag:
    """This rank's flag, up from boundary `raise_at` of the phase (the loop sets `now` before each boundary)."""

    def __init__(self, raise_at):
        self.raise_at, self.now = raise_at, 0

    def __call__(self) -> bool:
        return self.raise_at is not None and self.now >= self.raise_at


def run_phase(agreement: StopAgreement, flag: Flag, boundaries: int) -> dict:
    agreement.begin()
    stopped_at, ran = None, 0
    for b in range(boundaries):
        flag.now = b
        ran += 1
        if agreement.at_boundary():
            stopped_at = b
            break
    return {"stopped_at": stopped_at, "ran": ran, "end": agreement.end()}


def behind_rank_costs_no_wait(rank: int) -> dict:
    """Rank 1 reaches each boundary 1 s late. Rank 0's first `lag` (1, the default) boundaries must not wait for
    it: their results are read only at boundary `lag` and later."""
    agreement = StopAgreement(lambda: False)
    agreement.begin()
    dist.barrier()  # both ranks start the clock together
    seconds = []
    for _ in range(3):
        if rank == 1:
            time.sleep(1.0)
        start = time.perf_counter()
        agreement.at_boundary()
        seconds.append(time.perf_counter() - start)
    agreement.end()
    return {"seconds": seconds}


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    flag = Flag(None)
    agreements = {lag: StopAgreement(flag, lag=lag) for lag in (2, 1)}  # one side group made, used by both
    results = {}
    for name, (boundaries, raise_at, lag) in CASES.items():
        flag.raise_at = raise_at[rank]
        results[name] = run_phase(agreements[lag], flag, boundaries)
    results["behind_rank"] = behind_rank_costs_no_wait(rank)
    results["one_side_group"] = {"same": agreements[1].group is agreements[2].group}
    dist.barrier()  # neither rank tears the groups down while the other still uses them
    dist.destroy_process_group()
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
