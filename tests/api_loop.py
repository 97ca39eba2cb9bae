"""A 30-line training loop that uses only the public d3p API. tests/library/test_api.py runs it in process (every
method, resume) and under torchrun (2 gloo ranks: `python tests/api_loop.py OUT_DIR`)."""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import d3p

N, D, C, BATCH = 240, 8, 3, 16


def train(method, epochs, stop_after=None, resume=None, **options):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    model = torch.nn.Linear(D, C)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = d3p.DataPruner(N, method, epochs=epochs, seed=3, min_kept=BATCH, **options)
    start, logs = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        pruner.load_state_dict(resume["pruning"])
        start = resume["epoch"] + 1
    for epoch in range(start, stop_after or epochs):
        pruner.begin_epoch(epoch)
        for idx in torch.tensor(list(pruner.sampler), dtype=torch.int64).split(BATCH):
            loss = pruner.batch_loss(F.cross_entropy(model(x[idx]), y[idx], reduction="none"), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if pruner.forward_only_indices.size:  # D3P's recording epochs: losses of the pruned samples
            idx = torch.tensor(list(pruner.forward_sampler), dtype=torch.int64)
            with torch.no_grad():
                pruner.record(idx, F.cross_entropy(model(x[idx]), y[idx], reduction="none"))
        embeddings = x.numpy() if pruner.needs_embeddings else None  # D2 Pruning's hook: features [N, D]
        logs.append(pruner.end_epoch(epoch, embeddings=embeddings))
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "pruning": pruner.state_dict(),
             "epoch": (stop_after or epochs) - 1}
    return state, logs


D3P_OPTIONS = dict(d3p_start=2, d3p_period=2, d3p_window=2, d3p_bins=16)

if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    state, logs = train("d3p", 6, **D3P_OPTIONS)
    rank = torch.distributed.get_rank()
    np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"), pruned=state["pruning"]["strategy"]["pruned"].numpy(),
             weights=state["pruning"]["strategy"]["weights"].numpy(),
             kept=np.array([r["kept"] for r in logs]), fingerprints=np.array([r["plan_fingerprint"] for r in logs]),
             trained=np.array([r["samples_trained"] for r in logs]))
    torch.distributed.destroy_process_group()
