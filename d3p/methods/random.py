"""`RandomDynamic` ('random'): a fresh uniform random subset per epoch, optionally matched epoch by
epoch to a recorded run (`read_kept_counts`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from d3p.methods.common import _Base, _check_ratio, kept_size, uniform_subset
from d3p.strategy import EpochLosses, EpochPlan, epoch_rng


_PURPOSE_RANDOM = 31


class RandomDynamic(_Base):
    """A fresh uniform random subset each epoch (no weights, no recording).

    Size round((1-r)*N), or exactly kept_counts[epoch] when kept_counts is given (the fair control matched epoch by
    epoch to a recorded D3P run; see `read_kept_counts`).
    """

    name = "random"

    def __init__(
        self, num_samples: int, prune_ratio: float = 0.5, seed: int = 0, kept_counts: list[int] | None = None
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        _check_ratio(prune_ratio)
        self.num_samples = int(num_samples)
        self.prune_ratio = float(prune_ratio)
        self.seed = int(seed)
        self.kept_counts: list[int] | None = None
        if kept_counts is not None:
            counts = [int(c) for c in kept_counts]
            bad = [(e, c) for e, c in enumerate(counts) if not 1 <= c <= self.num_samples]
            if bad:
                raise ValueError(f"kept_counts must lie in [1, {self.num_samples}]; bad (epoch, count): {bad[:5]}")
            self.kept_counts = counts

    def epoch_size(self, epoch: int) -> int:
        """Number of samples kept in this epoch."""
        if self.kept_counts is None:
            return kept_size(self.num_samples, self.prune_ratio)
        if not 0 <= epoch < len(self.kept_counts):
            raise ValueError(
                f"epoch {epoch} has no recorded kept count: the matched run covers epochs "
                f"0..{len(self.kept_counts) - 1}"
            )
        return self.kept_counts[epoch]

    def plan_epoch(self, epoch: int) -> EpochPlan:
        kept = uniform_subset(self.num_samples, self.epoch_size(epoch), epoch_rng(self.seed, epoch, _PURPOSE_RANDOM))
        return EpochPlan(kept=kept, record_losses=False)

    def end_epoch(
        self, epoch: int, losses: EpochLosses | None, embeddings: np.ndarray | None = None
    ) -> dict[str, Any]:
        k = self.epoch_size(epoch)
        return {"kept": k, "epoch_prune_ratio": 1.0 - k / self.num_samples,
                "random_matched": self.kept_counts is not None}

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "prune_ratio": self.prune_ratio,
            "seed": self.seed,
            "kept_counts": None if self.kept_counts is None else list(self.kept_counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless apart from its config; checks that a matched run resumes with the same kept counts."""
        self._check_state(state)
        saved = state.get("kept_counts")
        if saved is not None and self.kept_counts is not None and list(saved) != self.kept_counts:
            raise ValueError("state_dict was saved with different kept_counts than this strategy was given")


def read_kept_counts(run_dir: str | Path) -> list[int]:
    """Kept counts of a recorded run, indexed by 0-based epoch, from RUN_DIR/log.txt.

    log.txt holds one JSON object per line with integer fields `epoch` (0-based) and `kept`. Blank lines are
    skipped; when an epoch appears twice (a resumed run re-logged it) the last line wins. Raises ValueError naming
    the file and the offending line, field or missing epochs; FileNotFoundError if the file does not exist.
    """
    path = Path(run_dir) / "log.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected the log.txt of a recorded D3P run)")
    counts: dict[int, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        values = {}
        for field_name in ("epoch", "kept"):
            if field_name not in row:
                raise ValueError(f"{path}:{lineno}: missing field {field_name!r} (fields: {sorted(row)})")
            value = row[field_name]
            if isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            ):
                raise ValueError(f"{path}:{lineno}: field {field_name!r} must be an integer, got {value!r}")
            values[field_name] = int(value)
        if values["epoch"] < 0 or values["kept"] < 0:
            raise ValueError(f"{path}:{lineno}: negative epoch or kept count: {values}")
        counts[values["epoch"]] = values["kept"]
    if not counts:
        raise ValueError(f"{path}: no epoch lines")
    last = max(counts)
    missing = [e for e in range(last + 1) if e not in counts]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"{path}: epochs {shown} are missing (found epochs up to {last})")
    return [counts[e] for e in range(last + 1)]
