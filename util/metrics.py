"""Smoothed metrics and a tqdm-based progress logger (rank 0 shows the bar)."""
from __future__ import annotations

import time
from collections import defaultdict, deque

import torch
from tqdm import tqdm

from util.dist import is_main_process


class SmoothedValue:
    """Running median/avg over a window plus a global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Collects meters; `log_every` wraps an iterable in a tqdm bar on rank 0.

    Meter values are per-rank; the engine reduces what it logs once per epoch.
    """

    def __init__(self) -> None:
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.data_seconds = 0.0

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return "  ".join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, header: str = "", total: int | None = None):
        """Yield from `iterable`, timing the wait for each item (data time), with a tqdm bar on rank 0."""
        total = len(iterable) if total is None else total
        bar = tqdm(total=total, desc=header, disable=not is_main_process(), dynamic_ncols=True, mininterval=2.0)
        end = time.time()
        for i, obj in enumerate(iterable):
            self.data_seconds += time.time() - end
            yield obj
            bar.update(1)
            if i % 10 == 0 or i == total - 1:
                # meters the engine has not flushed yet (it syncs with the host every print_freq steps) are
                # left out rather than shown as 0
                shown = [(k, m) for k, m in self.meters.items() if m.deque][:4]
                bar.set_postfix_str(" ".join(f"{k}={m.median:.4g}" for k, m in shown), refresh=False)
            end = time.time()
        bar.close()
