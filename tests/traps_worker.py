"""The library's cluster traps under 2 gloo ranks (tests/library/test_api.py): `python tests/traps_worker.py OUT_DIR`.

1. a DataPruner built before init_process_group splits the data across the ranks all the same;
2. end_epoch on rank 0 while rank 1 is already in the next begin_epoch: both ranks get an error naming the calls;
3. end_epoch on rank 0 only, rank 1 never joins: rank 0 times out with an error naming the call.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import d3p

N = 40

if __name__ == "__main__":
    out = sys.argv[1]
    pruner = d3p.DataPruner(N, "none", sync_timeout=4.0)  # 1. built before the process group
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    pruner.begin_epoch(0)
    result["share"] = list(pruner.sampler)
    result["world_size"] = pruner.sampler.num_replicas
    pruner.end_epoch(0)
    result["samples_trained"] = pruner.ledger.epochs[-1]["samples_trained"]
    try:  # 2. rank 0 ends epoch 1, rank 1 skipped it and begins epoch 2
        pruner.begin_epoch(1)
        pruner.end_epoch(1) if rank == 0 else pruner.begin_epoch(2)
        result["mismatch"] = ""
    except d3p.RankDivergenceError as e:
        result["mismatch"] = str(e)
    if rank == 0:  # 3. rank 1 never joins
        start = time.time()
        try:
            pruner.end_epoch(1)
            result["timeout"] = ""
        except d3p.CollectiveTimeoutError as e:
            result["timeout"] = str(e)
        result["waited"] = time.time() - start
    else:
        time.sleep(8)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # the process group is unusable after a timed-out collective
