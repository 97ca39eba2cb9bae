"""Stop requests: the signals that ask a run to stop, the flag their handler sets, loader workers that ignore
them, and the agreement of all ranks to stop at the same optimizer-step boundary (StopAgreement).

Why the agreement is pipelined: the ranks must stop after the same optimizer step (they then save one
consistent checkpoint, and none waits alone in a collective), so each needs every other rank's flag. Reading an
NCCL all-reduce's result is a device sync, and even a CPU collective that is waited for at once ties every
rank's host to the slowest one at every step. StopAgreement sends the flag on a gloo side group (CPU threads,
no device work) without waiting, and reads each result two boundaries later, when it has long arrived.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from d3p.collectives import get_rank
from util.dist import all_reduce_max_async_cpu


def stop_signals() -> tuple[signal.Signals, ...]:
    """What asks a run to stop: SIGTERM (SLURM at a time limit, scancel or preemption; torchrun's agent
    when it is stopped), SIGINT (Ctrl-C), SIGUSR1/SIGUSR2 (SLURM's early warning with --signal, which
    submitit sets to USR2)."""
    return tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class StopSignals:
    """A stop request from the scheduler, as a flag the training loop polls (a callable -> bool).

    The handler only sets the flag (and prints a line once); the ranks agree where to stop (StopAgreement,
    or the engine's sync points), save a mid-epoch checkpoint and exit with EXIT_STOPPED.
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
                        "optimizer step, stop where the ranks agree, save a checkpoint and exit\n".encode())

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
    training process has saved; they still exit when it shuts the loader down or dies (torch's watchdog).

    A worker is born with the stop signals blocked (`stop_signals_blocked` around the start of the workers): one
    sent before this function runs stays pending, and ignoring it here discards it; then they are unblocked."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals())
    if then is not None:
        then(worker_id)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals (block them in this thread) for a block that starts DataLoader workers.

    Why: a worker runs torch's own SIGTERM handler (which kills it when the sender is not its parent) from its
    start until its worker_init_fn ignores the stop signals. A scheduler's SIGTERM to the process group in that
    window (a loader whose workers start in the middle of a run: the forward-only or embedding pass, evaluation)
    killed the worker, and the rank failed with "DataLoader worker (pid N) is killed by signal: Terminated"
    instead of saving. A forked process inherits the signal mask: the workers start blocked, and
    `ignore_stop_signals_in_worker` ignores, then unblocks, them. In this process a signal that arrived meanwhile
    is delivered when the block ends (the stop flag is not lost).
    Only for fork, the default start method of loader workers on Linux up to Python 3.13 (this project's 3.11):
    a worker started by 'spawn' gets a fresh mask from Python's exec, and one started by 'forkserver' (Linux's
    default from Python 3.14) is forked by the server, not by this process; for them the window remains."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no process-group signals)
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_init(then: Callable[[int], None] | None = None) -> Callable[[int], None]:
    """ignore_stop_signals_in_worker composed with an optional `then(worker_id)` (picklable)."""
    return functools.partial(ignore_stop_signals_in_worker, then=then)


# --------------------------------------------------------------------------------------- the agreement
_SIDE_GROUP: tuple[Any, Any] | None = None  # (the default group it was made for, the gloo side group)


def stop_side_group():
    """The gloo process group that carries the stop flags, one per default process group.

    new_group is a collective: every rank reaches this at the same point (where it builds a StopAgreement),
    and the group is made once, however many agreements are built. gloo, also under NCCL: its all-reduce runs
    on CPU threads, so neither launching it nor reading its result touches the device."""
    global _SIDE_GROUP
    world = dist.group.WORLD
    if _SIDE_GROUP is None or _SIDE_GROUP[0] is not world:
        _SIDE_GROUP = (world, dist.new_group(backend="gloo"))
    return _SIDE_GROUP[1]


def release_side_group() -> None:
    """Forget the side group (util.dist.cleanup, before the process group is destroyed): a run started later in
    this process (submitit's requeue, tests) makes its own, and the old store's socket can close."""
    global _SIDE_GROUP
    _SIDE_GROUP = None


class StopAgreement:
    """All ranks agree to stop at the same optimizer-step boundary, with no device sync and no wait per step.

        agreement = StopAgreement(stop)        # stop: a callable -> bool (StopSignals); on every rank at once
        agreement.begin()                      # a phase starts: an epoch's training, a pass without gradient
        for batch in loader:
            ...                                # forward, backward; the optimizer step when one is due
            if update and agreement.at_boundary():
                break                          # True on every rank at the same boundary
        stop_agreed = agreement.end()          # drains; True on every rank when the ranks agreed to stop in
                                               # this phase: at a boundary, or in its last `lag` boundaries

    Protocol (boundaries b = 0, 1, ... of a phase; every rank calls at_boundary equally often, since their
    loaders have equal lengths): at boundary b each rank launches an all-reduce (MAX) of its local flag on the
    gloo side group with async_op=True, and waits for the one launched at b - lag (lag 1 by default: the next boundary after the one that saw the flag). The first
    boundary k whose reduced flag is set makes every rank return True at boundary k + lag: a flag seen at
    boundary k is obeyed after at most `lag` more optimizer steps, whatever --print_freq is.
    - Every rank stops at the same boundary: gloo matches the n-th collective of a group on every rank (its
      sequence tag), so each rank reads the same reduced values (MAX over all ranks' flags at the same
      boundary), boundary by boundary; the first set one is the same boundary on every rank.
    - The wait at k + lag costs nothing in practice: gloo runs the tiny all-reduce on the group's own CPU
      threads, and it ended while this rank did `lag` optimizer steps; the wait blocks only for a rank whose
      host is more than `lag` boundaries behind. No CUDA tensor is involved, so nothing syncs the device.
    - A phase that ends first (fewer than lag boundaries after k) is caught by end(), which waits for the
      outstanding works: all ranks issued the same ones, so none waits alone, and all return the same answer.
    One process (torch.distributed not initialised): no collective; at_boundary is True at the first
    boundary at which the local flag is set. `stop` None: never stops, no collective.
    A flag raised after a phase's last boundary is not part of this phase's answer: the next phase's boundaries
    see it, or the caller's own check between phases (util.dist.any_rank).
    """

    def __init__(self, stop: Callable[[], bool] | None, lag: int = 1):
        if lag < 0:
            raise ValueError(f"StopAgreement lag must be >= 0 boundaries, got {lag}. Fix: pass lag=1 (the default)")
        self.stop, self.lag = stop, int(lag)
        distributed = stop is not None and dist.is_available() and dist.is_initialized()
        self.group = stop_side_group() if distributed else None
        self._outstanding: deque[tuple[torch.Tensor, Any]] = deque()  # (flag tensor, its work), oldest first
        self.boundaries = 0  # at_boundary calls in this phase
        self.stopped_at: int | None = None  # the boundary at which at_boundary returned True

    def begin(self) -> None:
        """Start a phase. Works left by a phase that ended without end() (an exception) are waited for first:
        every rank issued them, so they complete."""
        self._drain()
        self.boundaries, self.stopped_at = 0, None

    def at_boundary(self) -> bool:
        """Call after each optimizer step (each batch of a pass without gradient), on every rank. True: the
        ranks agreed to stop here; every rank gets True at the same boundary."""
        if self.stopped_at is not None:
            raise RuntimeError(f"the ranks already agreed to stop at boundary {self.stopped_at} of this phase. "
                               "Fix: leave the loop when at_boundary() returns True, and call begin() for a new phase")
        boundary, self.boundaries = self.boundaries, self.boundaries + 1
        if self.stop is None:
            return False
        if self.group is None:
            agreed = bool(self.stop())
        else:
            flag = torch.tensor([1 if self.stop() else 0], dtype=torch.int32)  # CPU: gloo, no device
            self._outstanding.append((flag, all_reduce_max_async_cpu(flag, self.group)))
            agreed = len(self._outstanding) > self.lag and self._read_oldest()
        if agreed:
            self.stopped_at = boundary
        return agreed

    def end(self) -> bool:
        """End the phase: wait for the outstanding all-reduces (at most `lag`) -> whether the ranks agreed to
        stop in this phase, at a boundary (at_boundary returned True) or in its last `lag` boundaries (the phase
        ended before the agreed boundary came; the caller stops after the phase). The same answer on every rank."""
        return self._drain() or self.stopped_at is not None

    def _read_oldest(self) -> bool:
        flag, work = self._outstanding.popleft()
        work.wait()
        return bool(flag.item())

    def _drain(self) -> bool:
        agreed = False
        while self._outstanding:
            agreed = self._read_oldest() or agreed
        return agreed
