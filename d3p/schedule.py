"""D3P's schedule (spec §2): which epochs record losses, which decide, which train on all data.

The spec counts epochs from 1; code counts from 0 (MAE's loop). This is the only place that
translates: every method takes a 0-based `epoch` and adds 1 here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class D3PSchedule:
    start: int = 3  # s: first prune (decision) epoch, 1-based
    period: int = 10  # p: epochs between decisions
    window: int = 3  # n: recorded epochs ending with each decision epoch
    epochs: int = 800  # total pre-training epochs
    anneal_epochs: int = 0  # full data (no pruning) in the last K epochs

    def __post_init__(self) -> None:
        problems = validate_schedule(self.start, self.period, self.window, self.anneal_epochs)
        if problems:
            raise ValueError("; ".join(problems))

    def _spec(self, epoch: int) -> int:
        return epoch + 1

    def is_annealing(self, epoch: int) -> bool:
        """Last `anneal_epochs` epochs: all data, weights 1, nothing recorded."""
        return self._spec(epoch) > self.epochs - self.anneal_epochs

    def is_decision(self, epoch: int) -> bool:
        """A decision is made at the end of this epoch; it holds for the next `period` epochs."""
        e = self._spec(epoch)
        return e >= self.start and (e - self.start) % self.period == 0 and not self.is_annealing(epoch)

    def is_recording(self, epoch: int) -> bool:
        """One of the `window` epochs ending with a decision epoch that will be made: every sample
        needs a loss. A window whose decision falls after the last epoch or inside the anneal tail
        records nothing (no forward-only pass for losses no decision would read)."""
        if self.is_annealing(epoch):
            return False
        e = self._spec(epoch)
        if e <= self.start:
            in_window = e > self.start - self.window
        else:
            offset = (e - self.start) % self.period
            in_window = offset == 0 or offset > self.period - self.window
        return in_window and self.will_decide(self._decision_of_window(epoch))

    def _decision_of_window(self, epoch: int) -> int:
        """0-based decision epoch that ends the window of recording epoch `epoch`."""
        e = self._spec(epoch)
        if e <= self.start:
            return self.start - 1
        return epoch + (self.start - e) % self.period

    def will_decide(self, epoch: int) -> bool:
        """`epoch` (0-based) lies in the run and makes a decision."""
        return epoch < self.epochs and self.is_decision(epoch)

    def window_slot(self, epoch: int) -> int:
        """Position 0..window-1 of a recording epoch inside its window."""
        e = self._spec(epoch)
        offset = (e - self.start) % self.period
        return self.window - 1 - (0 if offset == 0 else self.period - offset)

    def decision_epochs(self) -> list[int]:
        """0-based epochs whose end makes a decision."""
        return [e for e in range(self.epochs) if self.is_decision(e)]


def validate_schedule(start: int, period: int, window: int, anneal_epochs: int = 0) -> list[str]:
    """Messages for the combinations the method forbids (1 <= n <= s, n <= p, ...); empty if valid."""
    problems = []
    if window < 1:
        problems.append(f"--d3p_window (n) must be >= 1, got {window}")
    if start < 1:
        problems.append(f"--d3p_start (s) must be >= 1, got {start}")
    if period < 1:
        problems.append(f"--d3p_period (p) must be >= 1, got {period}")
    if window > start:
        problems.append(f"--d3p_window (n={window}) must be <= --d3p_start (s={start}): the first decision needs n recorded epochs")
    if window > period:
        problems.append(f"--d3p_window (n={window}) must be <= --d3p_period (p={period}): windows of successive decisions would overlap")
    if anneal_epochs < 0:
        problems.append(f"--d3p_anneal_epochs must be >= 0, got {anneal_epochs}")
    return problems
