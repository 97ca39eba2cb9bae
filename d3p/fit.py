"""The fit diagnostic's threshold, actions and warning (docs/supervised.md), apart from d3p.stats so that
registering the D3P method (its options' defaults) does not import scipy. `d3p.stats.fit_ks` measures the fit."""
from __future__ import annotations

__all__ = ["D3PFitWarning", "FIT_KS_THRESHOLD", "POOR_FIT_ACTIONS"]

# The KS distance between the observed CLD and the ideal distribution above which D3P's model of the losses counts
# as a poor fit (docs/supervised.md#the-fit-diagnostic has the measurements behind the value).
FIT_KS_THRESHOLD = 0.2
# What a decision does when the fit is poor: only warn (the published method), keep the hard tail (samples above
# the support stay, weight 1), or keep everything (no pruning, no weights until the next decision).
POOR_FIT_ACTIONS = ("warn", "keep_tail", "keep_all")


class D3PFitWarning(UserWarning):
    """D3P's ideal (generalised chi-square) CLD distribution fits the observed CLD poorly: its decision rests on
    a model of the losses that does not hold (typically a classifier's cross-entropy, above all with noisy
    labels)."""
