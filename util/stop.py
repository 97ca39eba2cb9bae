"""Stop signals: what asks a run to stop (a scheduler's SIGTERM, SLURM's early warning, Ctrl-C), as a flag the
training loop polls, and DataLoader workers that outlive a signal sent to the whole process group."""
from __future__ import annotations

import functools
import os
import signal
from typing import Any, Callable, Sequence

from d3p.collectives import get_rank


def stop_signals() -> tuple[signal.Signals, ...]:
    """What asks a run to stop: SIGTERM (SLURM at a time limit, scancel or preemption; torchrun's agent
    when it is stopped), SIGINT (Ctrl-C), SIGUSR1/SIGUSR2 (SLURM's early warning with --signal, which
    submitit sets to USR2)."""
    return tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class StopSignals:
    """A stop request from the scheduler, as a flag the training loop polls at its sync points.

    The handler only sets the flag (and prints a line once); the engine finishes the current optimizer
    step, the ranks agree at the next sync point, save a mid-epoch checkpoint and exit with EXIT_STOPPED.
    A handler that was installed before (submitit's requeue on SIGUSR2) is called by `hand_over` after the
    save, so the job is still requeued. A second SIGINT interrupts at once (KeyboardInterrupt).
    """

    def __init__(self, signals: Sequence[signal.Signals] | None = None):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        for sig in signals or stop_signals():
            self._previous[int(sig)] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.signum = True, signum
            # os.write, not print: the handler may interrupt a print of the main thread (a reentrant call
            # into the same buffered stream raises)
            os.write(2, f"rank {get_rank()}: received signal {signal.Signals(signum).name}: will finish this "
                        "optimizer step, save a checkpoint at the next sync point (--print_freq) and exit\n".encode())

    def __call__(self) -> bool:
        return self.requested

    def hand_over(self) -> None:
        """After the save: give the signal to the handler that was there before (a Python function such as
        submitit's checkpoint-and-requeue), if any."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous):
            previous(self.signum, None)

    def restore(self) -> None:
        """Put the previous handlers back (the run is over)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def ignore_stop_signals_in_worker(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """worker_init_fn: a DataLoader worker ignores the stop signals.

    Why: schedulers signal the whole process group (torchrun's agent killpg()s each rank, SLURM signals
    every process of the step), so the workers get the SIGTERM too; torch's worker handler then kills the
    worker (the sender is not its parent) and the training process raises "DataLoader worker (pid N) is
    killed by signal: Terminated" before it can save. Ignored, the workers go on feeding the loop until the
    training process has saved; they still exit when it shuts the loader down or dies (torch's watchdog)."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def worker_init(then: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """ignore_stop_signals_in_worker composed with an optional `then(worker_id)` (picklable)."""
    return functools.partial(ignore_stop_signals_in_worker, then=then)


