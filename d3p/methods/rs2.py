"""`RS2` ('rs2'): Repeated Sampling of Random Subsets without replacement (Okanovic et al., ICLR 2024).

Each epoch trains on the next chunk of k = round((1 - r) N) samples of a shuffled permutation of the dataset;
when the permutation is used up it is reshuffled. Over ceil(N / k) ~ 1 / (1 - r) consecutive epochs every sample
is trained at least once, which a fresh random subset per epoch (`random`) does not guarantee.

The chunking follows the published sampler (`UniformNoReplacement` in PatrikOkanovic/RS2,
src/DeepCore/deepcore/methods/uniform_no_replacement.py), call by call:
  * the first call, and any call after a pass ended, reshuffles and returns chunk [0, k);
  * otherwise chunk [end, (end + k) mod (N + 1)): consecutive chunks while they fit;
  * a pass ends after a chunk that reached N exactly, or after a chunk that wrapped around. A wrapping chunk is
    the permutation's unseen tail [m k, N) followed by its head [0, (m + 1) k - N - 1) (m = floor(N / k)): the
    head samples are trained a second time in this pass, and the published modulus N + 1 makes this chunk one
    sample short (k - 1 samples). Both are kept here, so the arm is the published RS2 to the sample.
Hence a pass lasts L = ceil(N / k) epochs: N / k full chunks when k divides N (each sample exactly once), else
floor(N / k) full chunks plus the wrapping one. The published code draws its permutations from NumPy's global
generator; here pass c's permutation comes from `epoch_rng(seed, c, purpose)`, so the plan of epoch e is a pure
function of (seed, e): identical on every rank and after a resume, with no generator state to store.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from d3p.methods.common import PRUNE_RATIO, BaseStrategy, check_ratio, kept_size, sorted_unique_int64
from d3p.registry import register_method
from d3p.strategy import EpochLosses, EpochPlan, epoch_rng

_PURPOSE_RS2 = 37


@register_method("rs2", "dynamic", (PRUNE_RATIO,),
                 help="RS2: each epoch the next chunk of a shuffled permutation, reshuffled when used up")
class RS2(BaseStrategy):
    """Per-epoch random subsets without replacement: consecutive chunks of one permutation per pass.

    num_samples: N. prune_ratio: r in [0, 1); the chunk size is k = round((1 - r) N) (the published
    `round(n_train * fraction)`, fraction = 1 - r), at least 1. seed: the same on every rank.
    """

    name = "rs2"

    def __init__(self, num_samples: int, prune_ratio: float = 0.5, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        check_ratio(prune_ratio)
        self.num_samples = int(num_samples)
        self.prune_ratio = float(prune_ratio)
        self.seed = int(seed)
        self.chunk = kept_size(self.num_samples, self.prune_ratio)

    @property
    def pass_epochs(self) -> int:
        """L = ceil(N / k): epochs per pass over one permutation."""
        return -(-self.num_samples // self.chunk)

    def position(self, epoch: int) -> tuple[int, int]:
        """(pass c, chunk j in 0..L-1) of a 0-based epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return divmod(int(epoch), self.pass_epochs)

    def permutation(self, pass_index: int) -> np.ndarray:
        """int64 [N]: the shuffled order of pass `pass_index` (a pure function of seed and pass)."""
        return epoch_rng(self.seed, pass_index, _PURPOSE_RS2).permutation(self.num_samples).astype(np.int64)

    def chunk_bounds(self, j: int) -> tuple[int, int]:
        """(start, end) of chunk j as the published sampler holds them; end < start marks the wrapping chunk,
        which is perm[start:] + perm[:end]."""
        n, k = self.num_samples, self.chunk
        start = j * k
        end = start + k
        return (start, end) if end <= n else (start, end - n - 1)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """int64 [K] the epoch's samples in the permutation's order (K = k, or k - 1 for a wrapping chunk)."""
        c, j = self.position(epoch)
        perm = self.permutation(c)
        start, end = self.chunk_bounds(j)
        if start < end:
            return perm[start:end]
        return np.concatenate((perm[start:], perm[:end]))

    def plan_epoch(self, epoch: int) -> EpochPlan:
        return EpochPlan(kept=sorted_unique_int64(self.epoch_indices(epoch)), record_losses=False)

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        c, j = self.position(epoch)
        start, end = self.chunk_bounds(j)
        kept = (end - start) if start < end else (self.num_samples - start + end)
        return {"kept": kept, "epoch_prune_ratio": 1.0 - kept / self.num_samples, "rs2_pass": c, "rs2_chunk": j}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_samples": self.num_samples, "prune_ratio": self.prune_ratio, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless apart from its config: the pass structure depends on r and the permutations on the seed, so a
        resume with another --prune_ratio or --seed would silently train a different sequence; it is refused."""
        self.check_state(state)
        for key in ("prune_ratio", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict was saved with {key}={state[key]}, this run has {getattr(self, key)}. "
                                 f"Fix: resume with --{key} {state[key]}, or use a new --output_dir")
