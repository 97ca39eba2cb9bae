"""The D3P decision figure: observed CLD histogram against the ideal distribution.

Built on ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot state, no
backend switch), so it is safe in a training process and can be handed to TensorBoard's
``SummaryWriter.add_figure``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .stats import D3PDecision, IdealCLDDensity

__all__ = ["decision_figure", "plot_decision"]

_COLOURS = {"kept": "#4c72b0", "easy": "#55a868", "hard": "#c44e52", "trimmed": "#dd8452"}


def decision_figure(
    decision: D3PDecision,
    density: IdealCLDDensity | None = None,
    bins: int | None = None,
    log: bool = False,
    title: str | None = None,
) -> Figure:
    """Return the figure of one decision.

    Stacked histogram over the observed CLD range (kept / easy / hard / trimmed), the ideal
    density scaled to expected counts per bin (N * f(x) * width), and the support [a, b].
    density: defaults to ``decision.density``. bins: histogram bins over the observed range
    (default: as many as the decision used inside the support, at least 64). log: log y-axis
    (shows the tails).
    """
    density = density if density is not None else decision.density
    cld = decision.cld
    N = cld.size
    nb = int(bins) if bins is not None else max(int(decision.observed.size), 64)
    lo, hi = float(cld.min()), float(cld.max())
    if not hi > lo:
        hi = lo + 1.0  # all scores equal: any non-empty range draws the single bar
    edges = np.linspace(lo, hi, nb + 1)
    width = edges[1] - edges[0]

    a, b = (float(v) for v in decision.support)
    has_support = bool(np.isfinite(a) and np.isfinite(b))
    easy = decision.pruned & (cld < a) if has_support else np.zeros(N, bool)
    hard = decision.pruned & (cld > b) if has_support else np.zeros(N, bool)
    trimmed = decision.pruned & ~easy & ~hard

    parts = [
        ("kept", ~decision.pruned),
        ("trimmed", trimmed),
        ("easy", easy),
        ("hard", hard),
    ]
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)  # attaches the Agg canvas so savefig / add_figure can render
    ax = fig.add_subplot(1, 1, 1)
    bottom = np.zeros(nb)
    for name, mask in parts:
        counts, _ = np.histogram(cld[mask], bins=edges)
        if counts.any() or name == "kept":
            ax.bar(edges[:-1], counts, width=width, bottom=bottom, align="edge",
                   color=_COLOURS[name], linewidth=0,
                   label=f"{name} ({int(np.count_nonzero(mask)):,})")
        bottom += counts

    if density is not None:
        # Expected count per histogram bin; a fine x-grid so the curve is smooth within bins.
        x = np.linspace(lo, hi, 4 * nb + 1)
        ax.plot(x, N * density.pdf(x) * width, color="black", linewidth=1.2,
                label="ideal (N·f·width)")
    if has_support:
        for v, lab in ((a, "support a"), (b, "support b")):
            ax.axvline(v, color="grey", linestyle="--", linewidth=1)
            ax.annotate(lab, (v, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=7, color="grey")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("CLD (mean over the window of loss²)")
    ax.set_ylabel("samples per bin")
    head = title or "D3P decision"
    sub = f"N={N:,}  pruned {decision.prune_ratio:.1%}  up-weighted {decision.upweighted:,}"
    if np.isfinite(decision.fit_ks):  # the goodness of fit of the ideal distribution (d3p.stats.fit_ks)
        sub += f"  fit KS {decision.fit_ks:.3f}" + ("  POOR FIT: see docs/supervised.md" if decision.poor_fit else "")
    if decision.reason:
        sub += f"\n{decision.reason}"
    ax.set_title(f"{head}\n{sub}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def plot_decision(
    decision: D3PDecision,
    density: IdealCLDDensity | None,
    path: str | Path,
    log: bool = False,
    fmt: str | None = None,
) -> Path:
    """Write the decision figure; fmt defaults to the path's suffix (png if none)."""
    fig = decision_figure(decision, density, log=log)
    path = Path(path)
    fig.savefig(path, format=fmt or path.suffix.lstrip(".").lower() or "png")
    return path
