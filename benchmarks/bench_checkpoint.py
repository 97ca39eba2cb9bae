"""Time of one pre-training checkpoint save (model + AdamW state + scaler), against torchrun's grace period.

    python benchmarks/bench_checkpoint.py [--model mae_vit_base_patch16] [--dir /path/on/the/checkpoint/disk]
    python benchmarks/bench_checkpoint.py --signalled [--num_samples 1281167]

--signalled times the path a stop signal takes (util.run): SIGTERM to this process's group, the handler's
flag seen at a sync point, then the mid-epoch checkpoint of a D3P recording epoch with the pruning state
and recorded losses of `--num_samples` samples (ImageNet's by default), written atomically; the time from
the signal to the file being complete is what must fit in torchrun's --shutdown-timeout / SLURM's KillWait
(plus at most one optimizer step, which a training run adds).

On SIGTERM the ranks finish the current step, agree, and rank 0 writes this file (atomic_torch_save: write,
fsync, rename). torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default 30 s) before SIGKILL.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import models_mae  # noqa: E402
from util.checkpoint import atomic_torch_save  # noqa: E402
from util.run_folder import checkpoint_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mae_vit_base_patch16", choices=sorted(models_mae.MODELS))
    parser.add_argument("--dir", default=None, help="folder to write to (default: a temporary folder)")
    parser.add_argument("--repeats", default=3, type=int)
    parser.add_argument("--signalled", action="store_true", help="time signal -> mid-epoch checkpoint (util.run)")
    parser.add_argument("--num_samples", default=1281167, type=int, help="--signalled: dataset size")
    parser.add_argument("--device", default="cpu", help="--signalled: where the model and optimizer live")
    args = parser.parse_args()
    if args.signalled:
        signalled(args)
        return

    model = models_mae.MODELS[args.model]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    for p in model.parameters():  # one zero-gradient step creates AdamW's two moment buffers
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = os.path.join(folder, checkpoint_name(0))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            atomic_torch_save(state, path)
            times.append(time.perf_counter() - start)
        size = os.path.getsize(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.1f}M parameters, checkpoint {size / 2**30:.2f} GiB, "
          f"save {min(times):.1f}-{max(times):.1f} s ({size / 2**20 / min(times):.0f} MiB/s)")


def signalled(args: argparse.Namespace) -> None:
    """SIGTERM -> flag -> resume.save_partial_epoch of a D3P recording epoch, timed `--repeats` times."""
    import argparse as _argparse
    import signal

    import numpy as np

    import d3p
    from util import resume
    from util.engine import EpochMeters
    from util.stop import StopSignals
    from util.amp import ScaledOptimizerStep
    from util.stop import StopSignals

    model = models_mae.MODELS[args.model]().to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    n = args.num_samples
    pruner = d3p.DataPruner(n, "d3p", epochs=800, min_kept=4096, loss_kind="reconstruction")  # MAE: published D3P
    pruner.begin_epoch(0)  # a recording epoch: the checkpoint carries the losses recorded so far
    rng = np.random.default_rng(0)
    for start in range(0, n // 2, 65536):  # half of the epoch trained: its losses recorded
        index = torch.arange(start, min(start + 65536, n // 2))
        pruner.record(index, torch.from_numpy(rng.random(index.numel(), dtype=np.float32)))
    flags = _argparse.Namespace(output_dir=None, batch_size=128, model=args.model)
    stop = StopSignals([signal.SIGTERM])
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        flags.output_dir = folder
        times, size = [], 0
        for _ in range(args.repeats):
            stop.requested = False
            start = time.perf_counter()
            os.killpg(os.getpgid(0), signal.SIGTERM)
            while not stop():  # the training loop's sync point
                time.sleep(0.001)
            state = resume.run_state(flags, -1, model, optimizer, ScaledOptimizerStep(None, "cpu"), pruner)
            path = resume.save_partial_epoch(flags, 0, state, 100, 100 * 128, 60.0, EpochMeters(), pruner)
            times.append(time.perf_counter() - start)
            size = os.path.getsize(path)
    stop.restore()
    print(f"{args.model} + AdamW + D3P state of {n} samples: checkpoint {size / 2**30:.2f} GiB, signal -> saved "
          f"{min(times):.1f}-{max(times):.1f} s over {args.repeats} runs")


if __name__ == "__main__":
    main()
