"""How late a stop signal is obeyed, and what the ranks' stop agreement costs per optimizer step (issue 28).

    OMP_NUM_THREADS=1 python benchmarks/bench_stop_latency.py [--accum_iters 1 3 7] [--print_freq 20] 2>/dev/null

(a) The time spent inside util.stop.StopAgreement.at_boundary() on CPU, in microseconds per call: one process
    (no collective), and rank 0 of 2 gloo ranks (torch.multiprocessing) with the default lag 1 (this boundary's
    all-reduce launched, the one of the boundary before read), called back to back (then the loop runs at the
    all-reduce's latency: the read waits) and with a 10 ms host "step" between calls (the read finds the result
    ready); and lag 0 (launched and waited for at once: what a blocking agreement per step costs), for comparison.
(b) Micro-steps trained after a SIGTERM: a pre-training on the embedded digits, run through tests/fault_runner.py,
    in 1 process with FAULT=sigterm:0:5 (the process signals itself when the loader hands out batch 5 of epoch 0,
    before that batch's forward) and on 2 ranks under torchrun with FAULT=sigterm_agent:0:5:0 (rank 0 signals
    torchrun's agent, which signals both ranks' process groups, as SLURM does). The run saves and prints
    "stopped by signal in epoch 0 after step K"; micro-batches 5 .. K-1 were trained after the signal: K - 5.
    The bound: the flag is first seen at the end of the accumulation group of batch 5 (the optimizer step in
    progress), then one more optimizer step on more than one rank (StopAgreement's lag 1), so at most
    2 x accum_iter micro-batches; in 1 process there is no agreement to wait for.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from util.stop import StopAgreement  # noqa: E402

SIGNAL_AT = 5  # the batch of epoch 0 at which the run signals itself (the "training forward 5")
STOP_LINE = re.compile(r"stopped by signal in epoch 0 after step (\d+)")


# -------------------------------------------------------------------------------- (a) cost per boundary
def microseconds_per_boundary(agreement: StopAgreement, calls: int, step_seconds: float) -> float:
    """Mean time inside at_boundary() over `calls` boundaries, with a host-side "optimizer step" of
    `step_seconds` between them (a sleep: the host of a GPU run mostly waits for the device)."""
    agreement.begin()
    inside = 0.0
    for _ in range(calls):
        if step_seconds:
            time.sleep(step_seconds)
        start = time.perf_counter()
        agreement.at_boundary()
        inside += time.perf_counter() - start
    agreement.end()
    return inside / calls * 1e6


SETTINGS = (  # (label, lag, step seconds)
    ("lag 1, back to back", 1, 0.0),
    ("lag 1, 10 ms steps", 1, 0.010),
    ("lag 0 (blocking), 10 ms steps", 0, 0.010),
)


def _rank(rank: int, port: int, calls: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for label, lag, step in SETTINGS:
        agreement = StopAgreement(lambda: False, lag=lag)
        microseconds_per_boundary(agreement, 20, step)  # warm-up
        dist.barrier()
        value = microseconds_per_boundary(agreement, calls if step == 0 else calls // 10, step)
        if rank == 0:
            results[label] = value
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boundary_costs(calls: int) -> dict[str, float]:
    """Microseconds per at_boundary() call: one process, and rank 0 of 2 gloo ranks in each of SETTINGS."""
    costs = {"1 process, back to back": microseconds_per_boundary(StopAgreement(lambda: False), calls, 0.0)}
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), calls, results), nprocs=2, join=True)
        costs.update({f"2 gloo ranks, {label}": results[label] for label, _, _ in SETTINGS})
    return costs


# ------------------------------------------------------------------------- (b) micro-steps after a signal
def micro_steps_after_signal(accum_iter: int, args: argparse.Namespace, ranks: int = 1) -> int:
    """Run the pre-training with a SIGTERM at batch SIGNAL_AT of epoch 0 -> micro-batches trained after it."""
    with tempfile.TemporaryDirectory() as out:
        launcher = [sys.executable] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--nnodes=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
        cmd = [*launcher, "tests/fault_runner.py", "--epochs", "1", "--prune_method", "none",
               "--input_size", "16", "--batch_size", str(args.batch_size), "--num_workers", "0",
               "--accum_iter", str(accum_iter), "--print_freq", str(args.print_freq), "--warmup_epochs", "0",
               "--output_dir", out]
        fault = f"sigterm:0:{SIGNAL_AT}" if ranks == 1 else f"sigterm_agent:0:{SIGNAL_AT}:0"
        env = dict(os.environ, FAULT=fault, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    found = STOP_LINE.search(res.stdout + res.stderr)
    if (ranks == 1 and res.returncode != 128 + signal.SIGTERM) or found is None:
        raise RuntimeError(
            f"--accum_iter {accum_iter}: the run did not stop inside epoch 0's training (exit {res.returncode}); "
            f"its output ends:\n{(res.stdout + res.stderr)[-1500:]}\nFix: a smaller --batch_size (more steps per "
            "epoch), or read the error above")
    return int(found.group(1)) - SIGNAL_AT


def agreement_bound(accum_iter: int, lag: int = 1) -> int:
    """Micro-batches after the signal with StopAgreement polled after each optimizer step: the rest of the
    accumulation group the signal fell in (its end is the first boundary that sees the flag), then `lag` steps."""
    group_end = -(-(SIGNAL_AT + 1) // accum_iter) * accum_iter  # micro-batches done at that boundary
    return group_end - SIGNAL_AT + lag * accum_iter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accum_iters", nargs="+", type=int, default=[1, 3, 7])
    parser.add_argument("--print_freq", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8,
                        help="the digits' 1500 training images / 8 = 188 micro-batches per epoch: room for the latest stop "
                             "before StopAgreement (after micro-batch 140 at --accum_iter 7)")
    parser.add_argument("--calls", type=int, default=3000,
                        help="(a): at_boundary() calls timed back to back (a tenth of them with 10 ms steps)")
    args = parser.parse_args()

    print("(a) time inside StopAgreement.at_boundary() on CPU (rank 0), microseconds per optimizer step "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):")
    for name, us in boundary_costs(args.calls).items():
        print(f"    {name:45s} {us:8.1f}")

    print(f"(b) micro-batches trained after a SIGTERM at training batch {SIGNAL_AT} (digits, "
          f"--print_freq {args.print_freq}, --batch_size {args.batch_size}):")
    print("    accum_iter | measured, 1 process | measured, 2 ranks | StopAgreement's count | bound 2 x accum_iter")
    for accum_iter in args.accum_iters:
        start = time.perf_counter()
        one, two = micro_steps_after_signal(accum_iter, args), micro_steps_after_signal(accum_iter, args, ranks=2)
        print(f"    {accum_iter:10d} | {one:19d} | {two:17d} | {agreement_bound(accum_iter):21d} | {2 * accum_iter:20d}"
              f"   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
