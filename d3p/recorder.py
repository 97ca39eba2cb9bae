"""Per-sample loss recording for one epoch, with no host synchronisation per step."""
from __future__ import annotations

import numpy as np
import torch


class LossRecorder:
    """Keeps each step's (indices, losses) as device tensors and turns them into per-sample
    sums and counts once, at the end of the epoch (one device-to-host copy per epoch).

    Negative indices mark substituted (corrupt) images and are not recorded.
    """

    def __init__(self, num_samples: int):
        self.num_samples = int(num_samples)
        self._indices: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []
        self._carried: tuple[np.ndarray, np.ndarray] | None = None

    def carry_over(self, loss_sum: np.ndarray, count: np.ndarray) -> None:
        """Add totals recorded before a preemption (resuming mid-epoch; one rank carries them)."""
        self._carried = (np.asarray(loss_sum, dtype=np.float64), np.asarray(count, dtype=np.int32))

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """indices int64 [B] (any device), losses [B] (any device; detached here)."""
        self._indices.append(indices.detach())
        self._losses.append(losses.detach().float())

    def __len__(self) -> int:
        return sum(int(i.numel()) for i in self._indices)

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (loss_sum float64 [N], count int32 [N]) of this process's records."""
        loss_sum = np.zeros(self.num_samples, dtype=np.float64)
        count = np.zeros(self.num_samples, dtype=np.int32)
        if self._carried is not None:
            loss_sum += self._carried[0]
            count += self._carried[1]
        if not self._indices:
            return loss_sum, count
        idx = torch.cat([i.cpu() for i in self._indices]).numpy()
        val = torch.cat([v for v in self._losses]).cpu().double().numpy()
        valid = idx >= 0
        idx, val = idx[valid], val[valid]
        loss_sum += np.bincount(idx, weights=val, minlength=self.num_samples)
        count += np.bincount(idx, minlength=self.num_samples).astype(np.int32)
        return loss_sum, count
