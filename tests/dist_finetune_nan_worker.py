"""Run under torchrun by tests/training/test_finetune.py: rank 1's second batch is NaN. Both ranks must stop
at that step with engine_finetune's FloatingPointError (exit 3) instead of rank 0 hanging."""
import argparse
import sys

import torch
import torch.distributed as dist

import engine_finetune
from util import engine
from util.amp import ScaledOptimizerStep


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
    batches = [(torch.randn(2, 8), torch.tensor([0, 1])) for _ in range(3)]
    if rank == 1:
        batches[1] = (torch.full((2, 8), float("nan")), torch.tensor([0, 1]))
    args = argparse.Namespace(accum_iter=1, lr=0.1, min_lr=0.0, warmup_epochs=0, epochs=1, precision="fp32")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        engine.train_one_epoch(model, batches, opt, ScaledOptimizerStep(None, "cpu"), 0, args,
                               engine_finetune.SupervisedLoss(model, torch.nn.CrossEntropyLoss(), "cpu", 0))
    except FloatingPointError as exc:
        sys.stderr.write(f"rank {rank} stopped: {exc}\n")
        sys.stderr.flush()
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
