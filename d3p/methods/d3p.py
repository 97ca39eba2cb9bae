"""D3P as a PruningStrategy: record losses in the window epochs, decide at each prune epoch."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from d3p.messages import warn_at_caller
from d3p.registry import Option, register_method
from d3p.schedule import D3PSchedule, validate_schedule
from d3p.fit import FIT_KS_THRESHOLD, POOR_FIT_ACTIONS, D3PFitWarning
from d3p.strategy import EpochLosses, EpochPlan, epoch_rng

_DECISION_RNG = 1  # `purpose` of epoch_rng for the trimming draw


class D3P:
    """Distribution-aware Dynamic Data Pruning (spec §2-§7).

    Per-sample state on CPU: the loss window float32 [n, N], the pruned mask bool [N] and the
    weights float32 [N] — 4n + 5 bytes per sample (17 for n = 3).

    Every decision measures how well the ideal CLD distribution fits the observed one (`d3p.stats.fit_ks`) and
    warns (`D3PFitWarning`) past `fit_threshold`. The safety rails, off by default (the published method):
    max_weight > 0 caps the up-weights; min_kept_share > 0 keeps at least that share of the samples (the pruned
    samples closest to the support come back first); poor_fit chooses what a poorly fitting decision does
    (`d3p.stats.POOR_FIT_ACTIONS`).

    target_ratio (this project's extension, not the paper's; None: the published method): each decision keeps
    round((1 - target_ratio) N) samples, the ideal histogram's expected counts scaled by one factor so the kept
    CLD histogram keeps the ideal distribution's shape (`d3p.stats.scaled_bin_targets`; docs/spec.md).
    """

    name = "d3p"

    def __init__(
        self,
        num_samples: int,
        schedule: D3PSchedule,
        bins: int = 128,
        quantile: float = 0.999,
        seed: int = 0,
        min_kept: int = 1,
        max_weight: float = 0.0,
        min_kept_share: float = 0.0,
        poor_fit: str = "warn",
        fit_threshold: float = FIT_KS_THRESHOLD,
        target_ratio: float | None = None,
    ):
        if target_ratio is not None and not 0.0 <= target_ratio < 1.0:
            raise ValueError(f"target_ratio must lie in [0, 1), got {target_ratio}. Fix: a share of samples pruned, "
                             "e.g. 0.5, or None for the published method")
        self.target_ratio = None if target_ratio is None else float(target_ratio)
        self.num_samples = int(num_samples)
        self.schedule = schedule
        self.bins = int(bins)
        self.quantile = float(quantile)
        self.seed = int(seed)
        self.min_kept = int(min_kept)
        self.max_weight = float(max_weight)
        self.min_kept_share = float(min_kept_share)
        self.poor_fit = str(poor_fit)
        self.fit_threshold = float(fit_threshold)
        self.window = np.full((schedule.window, self.num_samples), np.nan, dtype=np.float32)
        self.pruned = np.zeros(self.num_samples, dtype=bool)
        self.weights = np.ones(self.num_samples, dtype=np.float32)
        self.decisions = 0
        # the latest decision (CLD, density) for TensorBoard; the caller drops it after logging
        self.last_decision = None

    # ------------------------------------------------------------------ plan
    def plan_epoch(self, epoch: int) -> EpochPlan:
        record = self.schedule.is_recording(epoch)
        if self.schedule.is_annealing(epoch) or not self.pruned.any():
            kept = np.arange(self.num_samples, dtype=np.int64)
            forward_only = np.zeros(0, dtype=np.int64)
        else:
            kept = np.flatnonzero(~self.pruned)
            forward_only = np.flatnonzero(self.pruned) if record else np.zeros(0, dtype=np.int64)
        weights = None
        if not self.schedule.is_annealing(epoch) and (self.weights != 1).any():
            weights = self.weights
        return EpochPlan(kept=kept, weights=weights, forward_only=forward_only, record_losses=record)

    # ------------------------------------------------------------- observe
    def end_epoch(self, epoch: int, losses: EpochLosses | None, embeddings=None) -> dict[str, Any]:
        if not self.schedule.is_recording(epoch):
            return {}
        if losses is None:
            raise RuntimeError(f"D3P needs the losses of recording epoch {epoch}")
        # losses.mean is NaN for a sample that got no loss: only an image replaced as unreadable
        # (--skip_corrupt) can miss one, since the forward-only pass covers every pruned sample
        self.window[self.schedule.window_slot(epoch)] = losses.mean.astype(np.float32)
        if not self.schedule.is_decision(epoch):
            return {}
        return self._decide(epoch)

    def _decide(self, epoch: int) -> dict[str, Any]:
        from d3p.stats import decide

        scored = np.isfinite(self.window).all(axis=0)  # samples with a loss in every window epoch
        unscored = int(self.num_samples - scored.sum())
        # the floor of the rail (a share of the dataset) and the batch floor (a full batch per rank), the larger
        share_floor = math.ceil(self.min_kept_share * self.num_samples - 1e-9) if self.min_kept_share else 0
        floor = max(self.min_kept, share_floor)
        if unscored == self.num_samples:
            return self._nothing_scored(epoch)
        window = self.window if not unscored else self.window[:, scored]
        target = None
        if self.target_ratio is not None:  # the unscored samples are kept (below): the scored ones fill the rest
            kept = int(round((1.0 - self.target_ratio) * self.num_samples))
            target = min(max(kept - unscored, 0), int(scored.sum()))
        decision = decide(
            window,  # float32; decide() works in float64 without copying the (n, N) window
            bins=self.bins,
            quantile=self.quantile,
            rng=epoch_rng(self.seed, epoch, _DECISION_RNG),
            min_kept=max(floor - unscored, 0),  # the unscored samples are kept: they count toward the floor
            max_weight=self.max_weight,
            poor_fit=self.poor_fit,
            fit_threshold=self.fit_threshold,
            target_kept=target,
        )
        if unscored:
            # a sample without a loss in every window epoch (one a drop_last loader left out, an unreadable
            # image) cannot be placed against the ideal law: it is kept, with weight 1, and decided next time
            self.pruned = np.zeros(self.num_samples, dtype=bool)
            self.pruned[scored] = decision.pruned
            self.weights = np.ones(self.num_samples, dtype=np.float32)
            self.weights[scored] = decision.weights
        else:
            self.pruned = decision.pruned.astype(bool)
            self.weights = decision.weights.astype(np.float32)
        self.decisions += 1
        self.last_decision = decision
        log = {
            "d3p_easy": int(decision.easy),
            "d3p_hard": int(decision.hard),
            "d3p_trimmed": int(decision.trimmed),
            "d3p_upweighted": int(decision.upweighted),
            "d3p_restored": int(decision.restored),
            # null when no support exists (nothing pruned): log.txt stays strict JSON
            "d3p_support": [None if np.isnan(v) else float(v) for v in decision.support],
            "d3p_decision_pruned": int(self.pruned.sum()),
            "d3p_unscored": unscored,
            "d3p_seconds": float(decision.seconds),
            # the fit diagnostic and the rails (null without an ideal distribution)
            "d3p_fit_ks": None if np.isnan(decision.fit_ks) else round(float(decision.fit_ks), 6),
            "d3p_max_weight": float(self.weights.max()),
            "d3p_capped": int(decision.capped),
            "d3p_tail_kept": int(decision.tail_kept),
        }
        if self.target_ratio is not None:
            log["d3p_target_scale"] = float(decision.scale)
        if decision.reason:
            log["d3p_note"] = decision.reason
        elif decision.restored:
            which = (f"--d3p_min_kept {self.min_kept_share:g} ({floor} samples)" if share_floor > self.min_kept
                     else f"one full batch per rank ({floor})")
            log["d3p_note"] = (
                f"the decision would have kept {floor - decision.restored} of {self.num_samples} samples; "
                f"{decision.restored} restored (closest to the support first) to keep {which}"
            )
        elif not self.pruned.any():
            log["d3p_note"] = "nothing pruned: the observed CLD histogram lies within the ideal one"
        rails = []
        if decision.capped:
            rails.append(f"{decision.capped} up-weights capped at {self.max_weight:g}")
        if decision.tail_kept:
            rails.append(f"{decision.tail_kept} hard samples kept (poor fit, --d3p_poor_fit keep_tail)")
        if decision.restored and share_floor > self.min_kept:
            rails.append(f"{decision.restored} samples added back for --d3p_min_kept {self.min_kept_share:g}")
        if rails:
            log["d3p_rails"] = "; ".join(rails)
        if decision.poor_fit:
            log["d3p_warning"] = self._poor_fit_message(epoch, decision.fit_ks, float(self.weights.max()), rails)
            warn_at_caller(log["d3p_warning"], D3PFitWarning)  # at the user's end_epoch (or loop) line
        self.window[:] = np.nan  # the next window starts empty
        return log

    def _nothing_scored(self, epoch: int) -> dict[str, Any]:
        """No sample has a loss in every window epoch (a recording epoch whose losses never reached
        end_epoch): nothing is pruned, every weight is 1, and the next window starts empty."""
        self.pruned = np.zeros(self.num_samples, dtype=bool)
        self.weights = np.ones(self.num_samples, dtype=np.float32)
        self.decisions += 1
        self.last_decision = None
        self.window[:] = np.nan
        return {"d3p_decision_pruned": 0, "d3p_unscored": self.num_samples,
                "d3p_note": f"no sample has a loss in every recording epoch of the window ending at epoch {epoch} "
                            "(an epoch left before its end_epoch?): nothing pruned"}

    def _poor_fit_message(self, epoch: int, ks: float, largest_weight: float, rails: list[str]) -> str:
        acted = f" The rails acted: {'; '.join(rails)}." if rails else ""
        off = [flag for flag, on in (("--d3p_max_weight", self.max_weight > 0),
                                     ("--d3p_min_kept", self.min_kept_share > 0)) if not on]
        return (
            f"D3P's model of the losses fits poorly at the decision of epoch {epoch}: the KS distance between the "
            f"observed CLD and the ideal distribution is {ks:.3f} (threshold {self.fit_threshold:g}). D3P assumes "
            "losses like MAE's reconstruction loss (sums of squared, roughly Gaussian errors); a classifier's "
            "cross-entropy, above all with noisy labels, is not like that, and the decision may then keep "
            f"mislabelled samples and weigh a few samples heavily (largest weight now {largest_weight:.1f}x)."
            f"{acted} What to do: compare with a control (--prune_method random --random_match RUN_DIR, or "
            "--prune_method none)"
            + (f"; turn on the rails ({', '.join(off)}: see docs/supervised.md)" if off else "")
            + "; or use another method (--prune_method infobatch). D3P is made for MAE pre-training."
        )

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "window": torch.from_numpy(self.window.copy()),
            "pruned": torch.from_numpy(self.pruned.copy()),
            "weights": torch.from_numpy(self.weights.copy()),
            "decisions": self.decisions,
            "seed": self.seed,
            "schedule": [self.schedule.start, self.schedule.period, self.schedule.window],
            "bins": self.bins,
            "quantile": self.quantile,
            "rails": self._rails(),
        }

    def _rails(self) -> dict[str, Any]:
        """The options besides the schedule that change decisions, by flag name (compared on resume)."""
        return {"d3p_max_weight": self.max_weight, "d3p_min_kept": self.min_kept_share,
                "d3p_poor_fit": self.poor_fit, "d3p_fit_threshold": self.fit_threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"pruning state is for {state['num_samples']} samples, the dataset has {self.num_samples}. "
                "Fix: resume with the same dataset, or start a new --output_dir"
            )
        sched = [self.schedule.start, self.schedule.period, self.schedule.window]
        if list(state["schedule"]) != sched:
            raise ValueError(
                f"checkpoint's D3P schedule (s, p, n) = {tuple(state['schedule'])} differs from the flags' "
                f"{tuple(sched)}. Fix: resume with the same --d3p_start/--d3p_period/--d3p_window"
            )
        saved = {"d3p_bins": state.get("bins"), "d3p_quantile": state.get("quantile"), **state.get("rails", {})}
        now = {"d3p_bins": self.bins, "d3p_quantile": self.quantile, **self._rails()}
        for name, value in saved.items():  # absent (None) in checkpoints of early versions: not compared
            if value is not None and value != now[name]:
                raise ValueError(
                    f"the checkpoint's D3P decisions were made with --{name} {value}, this run has --{name} "
                    f"{now[name]}: resuming would change the decisions mid-run. Fix: resume with --{name} {value}, "
                    "or start a new --output_dir")
        self.window = state["window"].numpy().copy()
        self.pruned = state["pruned"].numpy().copy()
        self.weights = state["weights"].numpy().copy()
        self.decisions = int(state["decisions"])
        self.seed = int(state["seed"])


# ------------------------------------------------------------------------------------------------ registration
D3P_OPTIONS = (
    Option("d3p_start", 3, int, "s: first prune epoch (1-based)", aliases=("--s",)),
    Option("d3p_period", 10, int, "p: epochs between decisions", aliases=("--p",)),
    Option("d3p_window", 3, int, "n: recorded epochs per decision", aliases=("--n",)),
    Option("d3p_bins", 128, int, "histogram bins", aliases=("--bin_num",), valid=lambda b: b >= 2, rule="must be >= 2"),
    Option("d3p_quantile", 0.999, float, "grid end of the ideal density", valid=lambda q: 0.0 < q < 1.0,
           rule="must lie in (0, 1)"),
    Option("d3p_anneal_epochs", 0, int, "full data in the last K epochs"),
    # the safety rails (docs/supervised.md): off by default, the published method; on for classification losses
    Option("d3p_max_weight", 0.0, float, "cap on D3P's up-weights (0: no cap, the published method; 1: no "
           "up-weights, the classification default)", valid=lambda w: w == 0 or w >= 1,
           rule="must be 0 (no cap) or >= 1", presets=(("classification", 1.0),)),
    # the classification floor, 0.7: within 3 points of the whole data with noisy labels on both benchmarks
    # (docs/supervised.md; benchmarks/bench_safe_default.py), where 0.5 lost 4.1 on the Gaussian mixture
    Option("d3p_min_kept", 0.0, float, "floor on the share of samples a decision keeps, in [0, 1] (0: none; "
           "classification default 0.7)", valid=lambda f: 0.0 <= f <= 1.0, rule="must lie in [0, 1]",
           presets=(("classification", 0.7),)),
    Option("d3p_poor_fit", "warn", str, "what a decision does when its fit KS exceeds --d3p_fit_threshold: warn "
           "(decide as usual), keep_tail (keep the samples above the support), keep_all (prune nothing)",
           choices=POOR_FIT_ACTIONS),
    Option("d3p_fit_threshold", FIT_KS_THRESHOLD, float, "KS distance between the observed and the ideal CLD "
           "distribution above which D3P warns (and --d3p_poor_fit acts)", valid=lambda t: 0.0 < t <= 1.0,
           rule="must lie in (0, 1]"),
    # this project's extension (docs/spec.md), not the paper's: D3P on the ratio frontier
    Option("d3p_target_ratio", None, float, "prune this share at every decision (this project's extension: the "
           "ideal CLD histogram's counts scaled to keep round((1-R)N) samples; default unset: the published "
           "method, whose ratio emerges from the data)", valid=lambda r: 0.0 <= r < 1.0, rule="must lie in [0, 1)",
           only_for_owner=True),
)


def _check_d3p(o: dict[str, Any], epochs: int | None) -> list[str]:
    return validate_schedule(o["d3p_start"], o["d3p_period"], o["d3p_window"], o["d3p_anneal_epochs"])


def _d3p_kept_set(state: dict[str, Any]) -> np.ndarray:
    """~pruned of the last decision (all samples before the first)."""
    pruned = np.asarray(state["pruned"].numpy() if hasattr(state["pruned"], "numpy") else state["pruned"], bool)
    return np.flatnonzero(~pruned).astype(np.int64)


@register_method("d3p", "dynamic", D3P_OPTIONS, needs_epochs=True, check=_check_d3p, kept_set=_d3p_kept_set,
                 help="Distribution-aware Dynamic Data Pruning")
def build_d3p(num_samples: int, epochs: int | None, seed: int, min_kept: int, d3p_start: int, d3p_period: int,
              d3p_window: int, d3p_bins: int, d3p_quantile: float, d3p_anneal_epochs: int, d3p_max_weight: float,
              d3p_min_kept: float, d3p_poor_fit: str, d3p_fit_threshold: float,
              d3p_target_ratio: float | None = None) -> D3P:
    schedule = D3PSchedule(d3p_start, d3p_period, d3p_window, epochs, d3p_anneal_epochs)
    return D3P(num_samples, schedule, d3p_bins, d3p_quantile, seed=seed, min_kept=min_kept, max_weight=d3p_max_weight,
               min_kept_share=d3p_min_kept, poor_fit=d3p_poor_fit, fit_threshold=d3p_fit_threshold,
               target_ratio=d3p_target_ratio)
