"""2 gloo ranks drive d3p.DataPruner with RS2 (tests/library/test_rs2.py): each rank saves its sampler share and the plan
fingerprint of every epoch. N = 45, r = 0.7: chunks of 14, the fourth epoch of each pass wraps (13 samples)."""
import os
import sys

import numpy as np
import torch

import d3p

if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    pruner = d3p.DataPruner(45, "rs2", epochs=9, seed=9, prune_ratio=0.7)
    shares, fingerprints = [], []
    for epoch in range(9):
        pruner.begin_epoch(epoch)
        shares.append(list(pruner.sampler))
        fingerprints.append(pruner.fingerprint)
        pruner.end_epoch(epoch)
    rank = torch.distributed.get_rank()
    np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"), shares=np.array(shares), fingerprints=np.array(fingerprints))
    torch.distributed.destroy_process_group()
