"""D3P statistics: the CLD score, its ideal distribution, the support and histogram matching.

Pure numpy/scipy, no torch, no global RNG: every random choice comes from a passed
``np.random.Generator`` so that every rank computes the same decision (spec section 8).
Shapes: ``n`` = recording epochs in the window, ``N`` = dataset size.

Numerical notes (spec section 4, and where we deliberately differ from the published code):

* The model for one epoch is ``l ~ Normal(mu_t, var_t)``, so ``var_t * X_t`` with
  ``X_t ~ ncx2(df=1, nc=mu_t**2/var_t)`` is simply ``(mu_t + sd_t*Z)**2``. For df=1 its CDF is
  closed form, ``Phi((sqrt(x)-|mu|)/sd) - Phi((-sqrt(x)-|mu|)/sd)``; we use that (and a
  bisection on it for quantiles) instead of scipy's general ``ncx2`` series: exact, vectorised
  and equally fast for any noncentrality, including mu >> sd (realistic MAE windows have
  lam ~ 10..400; a test checks lam = 1e8), and ~30x faster per point than ``ncx2.cdf``.
* The n component mass vectors are convolved with real FFTs (scipy.fft), then rescaled by 1/n.
* Each component is discretised into per-cell probability masses (CDF differences), not
  ``pdf(centre) * width``: df=1 has an integrable x**-1/2 singularity at 0 when lam is small.
* All components share the cell width ``h`` (needed for the FFT convolution) but each has its
  own origin, so the sum of cell centres ``o_t + (k_t + 1/2) h`` lies on the lattice
  ``sum_t o_t + (K + n/2) h``. The published code shifts the convolved grid by ``2*x0``
  instead of ``n*x0``; here the offset is carried exactly, and a test checks the mean.
* Grid extent: up to at least the spec's ``max_t var_t * ncx2.ppf(quantile, 1, lam_t)``,
  extended when ``N`` is so large that the left-off tail could still hold a tenth of a sample,
  because beyond the grid the density is 0 and would otherwise *define* the support boundary.
  It starts at a low quantile rather than 0, so realistic windows (mu >> sd) do not spend
  their cells on the empty interval [0, ~mu**2/2].
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy.special import ndtr, ndtri

from d3p.fit import FIT_KS_THRESHOLD, POOR_FIT_ACTIONS, D3PFitWarning

__all__ = [
    "D3PFitWarning",
    "DegenerateWindowError",
    "FIT_KS_THRESHOLD",
    "POOR_FIT_ACTIONS",
    "IdealCLDDensity",
    "HistogramMatch",
    "D3PDecision",
    "cld_score",
    "window_moments",
    "ideal_cld_density",
    "ideal_cld_density_from_moments",
    "support_boundary",
    "scaled_bin_targets",
    "histogram_match",
    "decide",
    "fit_ks",
]

# Cells of the CLD grid per standard deviation of the ideal CLD (bulk cells then hold < 0.2% of
# the mass, far below the 1e-2 KS requirement), and lower/upper bounds on the cell count.
_CELLS_PER_SD = 200
_MIN_CELLS = 8192
_MIN_CELLS_N1 = 1 << 18  # n=1 keeps the df=1 singularity at 0 (no convolution smooths it)
_MAX_CELLS = 1 << 21


class DegenerateWindowError(ValueError):
    """The loss window cannot define an ideal CLD distribution.

    ``kind`` is ``"non-finite"`` (NaN/inf losses: some sample got no loss, or training
    diverged) or ``"zero-variance"`` (some epoch has all losses equal), or ``"too-few"``
    (N < 2: no unbiased variance).
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Score
# --------------------------------------------------------------------------------------------


def cld_score(loss_window: np.ndarray) -> np.ndarray:
    """CLD of every sample (spec section 3).

    loss_window: (n, N) per-sample losses of the n recording epochs (any float dtype).
    Returns float64 (N,): ``mean_t loss[t]**2``. Loops over the n epochs (not samples) so the
    float64 temporaries are O(N), never O(n*N).
    """
    w = np.asarray(loss_window)
    if w.ndim != 2:
        raise ValueError(f"loss_window must have shape (n, N), got {w.shape}")
    acc = np.zeros(w.shape[1], dtype=np.float64)
    for row in w:
        acc += np.square(row, dtype=np.float64)
    acc /= w.shape[0]
    return acc


def window_moments(loss_window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch dataset mean and unbiased variance of the losses.

    loss_window: (n, N). Returns (mu, var), float64 (n,) each.
    Raises DegenerateWindowError for non-finite losses, N < 2 or a zero-variance epoch.
    """
    w = np.asarray(loss_window)
    if w.ndim != 2:
        raise ValueError(f"loss_window must have shape (n, N), got {w.shape}")
    n, N = w.shape
    if n < 1:
        raise ValueError("loss_window has no epochs (n = 0)")
    if N < 2:
        raise DegenerateWindowError("too-few", f"need at least 2 samples for a variance, got N={N}")
    mu = np.empty(n)
    var = np.empty(n)
    for t, row in enumerate(w):
        m = float(np.mean(row, dtype=np.float64))
        if not np.isfinite(m):
            bad = int(np.count_nonzero(~np.isfinite(row)))
            raise DegenerateWindowError(
                "non-finite",
                f"epoch {t} of the window has {bad} non-finite losses (NaN/inf): every sample "
                "needs a finite loss in every recording epoch",
            )
        mu[t] = m
        var[t] = float(np.var(row, ddof=1, dtype=np.float64))
        # Relative threshold: float32 losses that are all equal can still give var ~ 1e-30.
        if not var[t] > (1e-12 * max(m * m, np.finfo(np.float64).tiny)):
            raise DegenerateWindowError(
                "zero-variance",
                f"epoch {t} of the window has zero variance (all {N} losses equal {m:.6g}): "
                "the ideal CLD distribution is undefined",
            )
    return mu, var


# --------------------------------------------------------------------------------------------
# The ideal CLD distribution
# --------------------------------------------------------------------------------------------


def _fft_convolve(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Full linear convolution of two float64 1-D arrays via real FFTs (length len(x)+len(y)-1).

    What scipy.signal.fftconvolve computes; written on scipy.fft because importing
    scipy.signal costs 1-2 s, which the first decision of a run (and every CLI call) paid.
    """
    length = x.size + y.size - 1
    nfft = sfft.next_fast_len(length, real=True)
    out = sfft.irfft(sfft.rfft(x, nfft) * sfft.rfft(y, nfft), nfft)
    return out[:length]


def _sq_normal_cdf(x: np.ndarray, m: float, s: float) -> np.ndarray:
    """P((m + s*Z)**2 <= x) for Z ~ N(0,1), m >= 0: the CDF of var*ncx2(1, m**2/var)."""
    r = np.sqrt(np.maximum(x, 0.0))
    return ndtr((r - m) / s) - ndtr((-r - m) / s)


def _sq_normal_quantiles(m: np.ndarray, s: np.ndarray, p: float, upper: bool) -> np.ndarray:
    """Per-component x with P(c > x) = p (upper) or P(c < x) = p (lower), c = (m + s*Z)**2.

    Vectorised bisection in r = sqrt(x): both tails are evaluated as sums of two small normal
    tail probabilities, so p down to 1e-300 and any m/s ratio are accurate (no cancellation).
    """
    # Brackets: sf(r) = Phi((m-r)/s) + Phi((-r-m)/s) lies in [Phi((m-r)/s), 2*Phi((m-r)/s)].
    z1, z2 = -ndtri(p), -ndtri(p / 2)  # positive for p < 0.5
    lo = np.zeros_like(m)
    hi = m + s * z2 + s  # sf(hi) < p and cdf(hi) > 1 - p >= p
    if upper:
        lo = np.maximum(0.0, m + s * z1 - s)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if upper:
            val = ndtr((m - mid) / s) + ndtr((-mid - m) / s)  # sf, decreasing in r
            go_right = val > p
        else:
            val = ndtr((mid - m) / s) - ndtr((-mid - m) / s)  # cdf, increasing in r
            go_right = val < p
        lo = np.where(go_right, mid, lo)
        hi = np.where(go_right, hi, mid)
        if np.all(hi - lo <= 1e-15 * np.maximum(hi, 1e-300)):
            break
    r = 0.5 * (lo + hi)
    return r * r


@dataclass(frozen=True)
class IdealCLDDensity:
    """Density of CLD under the ideal model ``(1/n) sum_t var_t X_t``, X_t ~ ncx2(1, mu_t^2/var_t).

    Stored as probability masses of M equal cells ``[lo + k*width, lo + (k+1)*width)``; the
    density is piecewise constant (mass/width) on them and 0 outside, so it integrates exactly
    to ``total_mass`` (= 1 - the tail left off, at most ``tail_bound``).

    mu, var:    float64 (n,) per-epoch mean and unbiased variance of the losses.
    lo, width:  left edge of the first cell and the cell width (CLD units).
    mass:       float64 (M,) probability of each cell.
    quantile:   the spec's grid quantile the grid covers at least.
    tail_bound: upper bound on the probability outside the grid.
    """

    mu: np.ndarray
    var: np.ndarray
    lo: float
    width: float
    mass: np.ndarray = field(repr=False)
    quantile: float
    tail_bound: float

    @property
    def n(self) -> int:
        return int(self.mu.size)

    @property
    def lam(self) -> np.ndarray:
        """float64 (n,) noncentralities mu_t**2 / var_t."""
        return self.mu**2 / self.var

    @property
    def hi(self) -> float:
        return self.lo + self.width * self.mass.size

    @property
    def edges(self) -> np.ndarray:
        """float64 (M+1,) cell edges."""
        return self.lo + self.width * np.arange(self.mass.size + 1)

    @property
    def centres(self) -> np.ndarray:
        """float64 (M,) cell centres."""
        return self.lo + self.width * (np.arange(self.mass.size) + 0.5)

    @property
    def total_mass(self) -> float:
        return float(self.mass.sum())

    def pdf(self, x: np.ndarray | float) -> np.ndarray:
        """Density at x (any shape); 0 outside [lo, hi)."""
        x = np.asarray(x, dtype=np.float64)
        k = np.floor((x - self.lo) / self.width)
        ok = (k >= 0) & (k < self.mass.size)
        out = np.zeros(x.shape)
        out[ok] = self.mass[k[ok].astype(np.int64)] / self.width
        return out

    def cdf(self, x: np.ndarray | float) -> np.ndarray:
        """P(CLD <= x) (any shape): exact at cell edges, linear inside a cell."""
        cum = np.concatenate(([0.0], np.cumsum(self.mass)))
        return np.interp(np.asarray(x, dtype=np.float64), self.edges, cum)

    def mean(self) -> float:
        """Mean of the discretised distribution (renormalised over the grid)."""
        return float(np.dot(self.mass, self.centres) / self.mass.sum())

    def analytic_mean(self) -> float:
        """Exact model mean (1/n) sum_t (mu_t**2 + var_t)."""
        return float(np.mean(self.mu**2 + self.var))

    def analytic_var(self) -> float:
        """Exact model variance (1/n**2) sum_t (2 var_t**2 + 4 mu_t**2 var_t)."""
        return float(np.sum(2 * self.var**2 + 4 * self.mu**2 * self.var) / self.n**2)


def ideal_cld_density_from_moments(
    mu: np.ndarray,
    var: np.ndarray,
    quantile: float = 0.999,
    num_samples: int | None = None,
    grid_points: int | None = None,
) -> IdealCLDDensity:
    """Ideal CLD density for per-epoch loss means ``mu`` and variances ``var`` (float (n,)).

    quantile:    the grid covers at least each component's ``quantile`` (spec section 4).
    num_samples: N; if given, the grid is widened until the tail it leaves off is below
                 0.1/N (it could then not hold an expected sample, so it cannot move the
                 support boundary of section 5). Without it the tail left off is <= 1-quantile.
    grid_points: minimum number of cells (default adaptive: >= 8192, >= 200 per ideal sd,
                 2**18 for n=1, at most 2**21).
    """
    mu = np.abs(np.asarray(mu, dtype=np.float64).ravel())  # the model depends on mu**2 only
    var = np.asarray(var, dtype=np.float64).ravel()
    if mu.shape != var.shape or mu.size == 0:
        raise ValueError(f"mu and var must be non-empty and of equal shape, got {mu.shape}, {var.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(var))):
        raise DegenerateWindowError("non-finite", "non-finite epoch mean or variance")
    if not np.all(var > 0):
        raise DegenerateWindowError("zero-variance", f"epoch variances must be > 0, got {var}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    n = mu.size
    sd = np.sqrt(var)

    tail = 1.0 - quantile
    if num_samples is not None:
        tail = min(tail, 0.1 / max(int(num_samples), 1))
    # Each component is cut at its p/(2n) lower and upper quantiles; by the union bound the
    # convolved CLD loses at most `tail` in all. The upper cut is never inside the spec's
    # `ppf(quantile)` because tail/(2n) <= 1 - quantile.
    p = tail / (2 * n)
    comp_lo = _sq_normal_quantiles(mu, sd, p, upper=False)
    comp_hi = _sq_normal_quantiles(mu, sd, p, upper=True)
    # The CLD grid ends at mean(comp_hi); raising every cut to the spec's grid end
    # max_t var_t * ppf(quantile) keeps the grid at least as long as the spec's.
    spec_end = float(np.max(_sq_normal_quantiles(mu, sd, 1.0 - quantile, upper=True)))
    comp_hi = np.maximum(comp_hi, spec_end)

    # Cell width of the CLD grid: resolve the ideal sd finely, but keep the cell count bounded.
    sd_y = np.sqrt(np.sum(2 * var**2 + 4 * mu**2 * var)) / n
    range_y = float(np.mean(comp_hi) - np.mean(comp_lo))
    min_cells = grid_points if grid_points is not None else (_MIN_CELLS_N1 if n == 1 else _MIN_CELLS)
    cells = int(np.clip(np.ceil(range_y / sd_y * _CELLS_PER_SD), min_cells, _MAX_CELLS))
    h_y = range_y / cells
    h = n * h_y  # cell width of each component; S = n*CLD so S-cells are n times wider

    mass = None
    for t in range(n):
        m_t = max(int(np.ceil((comp_hi[t] - comp_lo[t]) / h)), 1)
        edges = comp_lo[t] + h * np.arange(m_t + 1)
        cdf = _sq_normal_cdf(edges, mu[t], sd[t])
        cdf[0] = 0.0  # fold the (< p) mass below the cut into the first cell
        comp = np.diff(cdf)
        mass = comp if mass is None else _fft_convolve(mass, comp)
    # FFT round-off leaves values ~1e-17 below zero; a probability cannot be negative.
    mass = np.maximum(mass, 0.0)
    # Component t's cell k has centre comp_lo[t] + (k + 1/2) h, so the sum's cell K has centre
    # sum_t comp_lo[t] + (K + n/2) h: the offset is n half-cells, not 2 (the published defect).
    # Dividing by n: CLD cell K has centre mean(comp_lo) + (K + n/2) h_y, left edge
    # mean(comp_lo) + (K + (n-1)/2) h_y.
    lo = float(np.mean(comp_lo) + 0.5 * (n - 1) * h_y)
    return IdealCLDDensity(
        mu=mu, var=var, lo=lo, width=h_y, mass=mass, quantile=float(quantile), tail_bound=float(tail)
    )


def ideal_cld_density(
    loss_window: np.ndarray, quantile: float = 0.999, grid_points: int | None = None
) -> IdealCLDDensity:
    """Ideal CLD density of a (n, N) loss window (spec section 4).

    Uses each epoch's mean and unbiased variance; the grid is sized for N (see
    ``ideal_cld_density_from_moments``). Raises DegenerateWindowError (a ValueError with
    ``.kind``) for non-finite losses, N < 2, or an epoch with zero variance.
    """
    mu, var = window_moments(loss_window)
    return ideal_cld_density_from_moments(
        mu, var, quantile=quantile, num_samples=np.shape(loss_window)[1], grid_points=grid_points
    )


# --------------------------------------------------------------------------------------------
# Support and histogram matching
# --------------------------------------------------------------------------------------------


def support_boundary(
    cld: np.ndarray, density: IdealCLDDensity, bins: int
) -> tuple[float, float] | None:
    """Support [a, b] of the ideal distribution at the resolution of the data (spec section 5).

    cld: float (N,). Over the observed range, 8*bins fine bins of width w have expected count
    floor(N * f(centre) * w); [a, b] spans from the left edge of the first fine bin with an
    expected count >= 1 to the right edge of the last. Returns None when no fine bin expects a
    sample (N too small for the resolution, or the data lies off the ideal distribution) or
    when all CLD values are equal.
    """
    N = cld.size
    c_min, c_max = float(cld.min()), float(cld.max())
    if not c_max > c_min:
        return None
    fine = 8 * bins
    w = (c_max - c_min) / fine
    centres = c_min + w * (np.arange(fine) + 0.5)
    expected = np.floor(N * density.pdf(centres) * w)
    hit = np.flatnonzero(expected >= 1)
    if hit.size == 0:
        return None
    i0, i1 = int(hit[0]), int(hit[-1])
    # Use the exact observed extremes at the ends, so rounding in c_min + fine*w cannot leave
    # the extreme sample a hair outside a support that should contain it.
    a = c_min if i0 == 0 else c_min + i0 * w
    b = c_max if i1 == fine - 1 else c_min + (i1 + 1) * w
    return a, b


def fit_ks(cld: np.ndarray, density: IdealCLDDensity) -> float:
    """Kolmogorov-Smirnov distance sup_x |F_obs(x) - F_ideal(x)| between the observed CLD sample and the ideal
    distribution (the goodness-of-fit of the model the decision rests on).

    cld: float (N,). Exact for the piecewise-linear ideal CDF (``density.cdf``): the supremum over a step
    function against a continuous one is reached at the sample points, from the left or the right. 0 for a
    perfect fit, 1 when the two do not overlap. O(N log N) (one sort); no randomness.
    """
    x = np.sort(np.asarray(cld, dtype=np.float64))
    n = x.size
    if n == 0:
        raise ValueError("fit_ks needs at least one CLD value")
    ideal = density.cdf(x)
    above = np.arange(1, n + 1, dtype=np.float64) / n - ideal  # F_obs just right of each point
    below = ideal - np.arange(n, dtype=np.float64) / n  # F_obs just left of it
    return float(max(above.max(), below.max(), 0.0))


@dataclass
class HistogramMatch:
    """Result of matching the observed CLD histogram to the ideal one inside [a, b].

    trimmed:  bool (N,) samples pruned from over-filled bins (sum(max(h_k - e_k, 0)) of them).
    weights:  float32 (N,) e_k/h_k for samples of under-filled non-empty bins, else 1.
    observed: int64 (bins,) h_k, counts of in-support samples.
    expected: int64 (bins,) e_k = floor(N * f(centre_k) * width).
    upweighted: number of samples with weight > 1.
    scale: c of the target-ratio extension (`scaled_bin_targets`); 1.0 for the published rule.
    """

    trimmed: np.ndarray
    weights: np.ndarray
    observed: np.ndarray
    expected: np.ndarray
    upweighted: int
    scale: float = 1.0


def scaled_bin_targets(
    observed: np.ndarray, expected: np.ndarray, kept: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Per-bin kept counts t_k = min(o_k, floor(c x_k)) that sum to exactly `kept` (this project's target-ratio
    extension of spec section 6, not the paper's): the ideal expected counts x_k = N f(centre_k) width are scaled
    by one factor c, so the kept histogram keeps the ideal distribution's shape. c = 1 gives the published
    targets floor(x_k).

    observed: int64 (bins,) o_k; expected: float64 (bins,) x_k >= 0; kept: the samples to keep in the support,
    clipped to [0, sum o_k] (the support cannot hold more). c is the smallest value (bisection to float
    resolution) with sum_k t_k >= kept; bins whose floor(c x_k) steps at that same c (ties) can overshoot by a
    few samples, which are taken back one per tied bin, chosen by `rng`. Returns (t int64 (bins,), c).
    """
    o = np.asarray(observed, dtype=np.int64)
    x = np.asarray(expected, dtype=np.float64)
    kept = int(min(max(int(kept), 0), int(o[x > 0].sum())))

    def targets(c: float) -> np.ndarray:
        return np.minimum(o, np.floor(c * x).astype(np.int64))

    if kept == 0:
        return np.zeros_like(o), 0.0
    lo, hi = 0.0, float(((o + 1) / np.where(x > 0, x, np.inf)).max())  # at hi every bin holds its o_k
    while True:  # hi - lo halves until no float lies between them
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if int(targets(mid).sum()) >= kept:
            hi = mid
        else:
            lo = mid
    t, below = targets(hi), targets(lo)
    excess = int(t.sum()) - kept
    if excess > 0:  # tied steps: take one sample back from `excess` of the bins that stepped between lo and hi
        steps = np.repeat(np.arange(o.size), t - below)
        back = rng.choice(steps.size, size=excess, replace=False, shuffle=False)
        np.subtract.at(t, steps[back], 1)
    return t, hi


def histogram_match(
    cld: np.ndarray,
    density: IdealCLDDensity,
    support: tuple[float, float],
    bins: int,
    rng: np.random.Generator,
    target_kept: int | None = None,
) -> HistogramMatch:
    """Spec section 6: trim over-filled bins uniformly at random, up-weight under-filled ones.

    cld: float (N,); support: (a, b) with a < b; rng: the only source of randomness.
    target_kept: None, the published rule (bin targets e_k); else the samples to keep inside the support, with
    targets `scaled_bin_targets` (this project's extension: the ideal counts scaled to keep that many).
    Vectorised: one stable (radix, for int16 bin ids) argsort groups samples by bin; the loop
    runs over bins only.
    """
    N = cld.size
    a, b = float(support[0]), float(support[1])
    width = (b - a) / bins
    bin_dtype = np.int16 if bins < np.iinfo(np.int16).max else np.int32
    # Bin id of every sample, `bins` = the sentinel "outside [a, b]". Whole-array passes, no
    # boolean fancy indexing (that was the slowest step at N = 14M). cld == b (and rounding
    # just below it) lands in the last bin; below a the id is negative, above b it exceeds
    # bins - 1, and both become the sentinel.
    kf = cld - a
    kf /= width
    np.floor(kf, out=kf)
    outside = (cld < a) | (cld > b)
    np.clip(kf, 0, bins - 1, out=kf)
    kf[outside] = bins
    k = kf.astype(bin_dtype)
    del kf, outside

    counts = np.bincount(k, minlength=bins + 1)
    observed = counts[:bins].astype(np.int64)
    centres = a + width * (np.arange(bins) + 0.5)
    ideal = N * density.pdf(centres) * width
    expected = np.floor(ideal).astype(np.int64)
    # target: the ideal count of a bin (up-weights); cap: what it keeps (trims). Both e_k in the published rule
    target, cap, scale = expected, expected, 1.0
    if target_kept is not None:
        cap, scale = scaled_bin_targets(observed, ideal, target_kept, rng)
        target = np.floor(scale * ideal).astype(np.int64)

    under = (observed > 0) & (observed < target)
    ratio = np.ones(bins + 1, dtype=np.float32)
    ratio[:bins][under] = (target[under] / observed[under]).astype(np.float32)
    weights = ratio[k]  # gather over a (bins+1)-table: no per-sample Python loop

    excess = np.maximum(observed - cap, 0)
    trimmed = np.zeros(N, dtype=bool)
    if np.any(excess > 0):
        order = np.argsort(k, kind="stable")  # samples grouped by bin, index order inside
        starts = np.concatenate(([0], np.cumsum(counts)))
        for j in np.flatnonzero(excess):
            members = order[starts[j] : starts[j + 1]]
            pick = rng.choice(members.size, size=int(excess[j]), replace=False, shuffle=False)
            trimmed[members[pick]] = True
    return HistogramMatch(
        trimmed=trimmed,
        weights=weights,
        observed=observed,
        expected=expected,
        upweighted=int(observed[under].sum()),
        scale=scale,
    )


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


@dataclass
class D3PDecision:
    """One D3P decision over N samples.

    pruned:   bool (N,) not trained until the next decision.
    weights:  float32 (N,) loss weights (1 for pruned samples and outside under-filled bins).
    cld:      float64 (N,) the score.
    support:  float64 (2,) [a, b]; NaN when no support was found (nothing pruned).
    observed, expected: int64 (bins,) histogram inside the support (zeros without support).
    easy, hard, trimmed: samples pruned below a, above b, from over-filled bins (before restore; with
              poor_fit="keep_tail" the `hard` ones are kept, counted in tail_kept).
    upweighted: samples with weight > 1. restored: pruned samples given back for min_kept.
    prune_ratio: pruned.sum() / N. seconds: wall time of the decision.
    reason:   '' normally; why nothing was pruned otherwise.
    density:  the ideal distribution used (None when it could not be built).
    fit_ks:   KS distance between the observed CLD and the ideal distribution (`fit_ks`); NaN without density.
    poor_fit: fit_ks > the decision's fit_threshold.
    capped:   up-weights lowered to max_weight. tail_kept: hard samples kept because the fit was poor
              (poor_fit="keep_tail"). max_weight: the largest weight after the rails.
    """

    pruned: np.ndarray
    weights: np.ndarray
    cld: np.ndarray
    support: np.ndarray
    observed: np.ndarray
    expected: np.ndarray
    easy: int = 0
    hard: int = 0
    trimmed: int = 0
    upweighted: int = 0
    restored: int = 0
    prune_ratio: float = 0.0
    seconds: float = 0.0
    reason: str = ""
    density: IdealCLDDensity | None = field(default=None, repr=False)
    fit_ks: float = float("nan")
    poor_fit: bool = False
    capped: int = 0
    tail_kept: int = 0
    scale: float = 1.0

    @property
    def max_weight(self) -> float:
        return float(self.weights.max()) if self.weights.size else 1.0

    @property
    def num_samples(self) -> int:
        return int(self.pruned.size)

    @property
    def num_pruned(self) -> int:
        return int(np.count_nonzero(self.pruned))

    def kept_indices(self) -> np.ndarray:
        """int64 sorted indices of the kept samples."""
        return np.flatnonzero(~self.pruned).astype(np.int64)

    def summary(self) -> dict[str, float | int | str]:
        """Scalars for logging / the CLI's JSON line."""
        return {
            "N": self.num_samples,
            "pruned": self.num_pruned,
            "easy": self.easy,
            "hard": self.hard,
            "trimmed": self.trimmed,
            "upweighted": self.upweighted,
            "restored": self.restored,
            "prune_ratio": self.prune_ratio,
            "seconds": self.seconds,
            "support": [float(v) for v in self.support],
            "reason": self.reason,
            "fit_ks": None if np.isnan(self.fit_ks) else self.fit_ks,
            "poor_fit": self.poor_fit,
            "max_weight": self.max_weight,
            "capped": self.capped,
            "tail_kept": self.tail_kept,
        }


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    # None means seed 0, not OS entropy: every rank must draw the same trimmed set.
    return np.random.default_rng(0 if rng is None else rng)


def decide(
    loss_window: np.ndarray,
    bins: int = 128,
    quantile: float = 0.999,
    rng: np.random.Generator | int | None = None,
    min_kept: int = 1,
    max_weight: float = 0.0,
    poor_fit: str = "warn",
    fit_threshold: float = FIT_KS_THRESHOLD,
    target_kept: int | None = None,
) -> D3PDecision:
    """Make one D3P decision from an (n, N) loss window (spec sections 3-6), with its goodness of fit.

    bins:     histogram bins inside the support (>= 2).
    quantile: grid quantile of the ideal distribution, in (0, 1).
    rng:      Generator or seed (None = seed 0); all ranks must pass the same.
    min_kept: if fewer would be kept, pruned samples closest to the support (distance 0 for
              trimmed ones, ties broken at random) are restored until min_kept are kept.
    The safety rails (not in the published method; their defaults leave the decision unchanged bit for bit):
    max_weight: > 0 caps every up-weight at this value (0: no cap).
    poor_fit: what to do when ``fit_ks`` exceeds ``fit_threshold`` (`POOR_FIT_ACTIONS`): "warn" decides as usual
              (the caller warns), "keep_tail" keeps the samples above the support (weight 1), "keep_all" prunes
              nothing and weighs nothing.
    target_kept: None (the published method) or the samples to keep: this project's extension (docs/spec.md),
              not the paper's. The ideal histogram's expected counts are scaled by one factor so that the kept
              samples number exactly target_kept (`scaled_bin_targets`); outside the support stays pruned (hard
              samples kept by keep_tail count towards it), so a target above what the support holds keeps less.
    A zero-variance epoch or an empty support prunes nothing and sets ``reason``;
    non-finite losses raise DegenerateWindowError (an upstream bug: every sample must have a
    loss in every recording epoch).
    """
    start = time.perf_counter()
    w = np.asarray(loss_window)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"loss_window must have shape (n >= 1, N >= 1), got {w.shape}")
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins}")
    bins = int(bins)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if not (max_weight == 0 or max_weight >= 1):
        raise ValueError(f"max_weight must be 0 (no cap) or >= 1, got {max_weight}")
    if poor_fit not in POOR_FIT_ACTIONS:
        raise ValueError(f"poor_fit must be one of {POOR_FIT_ACTIONS}, got {poor_fit!r}")
    gen = _as_generator(rng)
    N = w.shape[1]
    min_kept = int(min(max(int(min_kept), 0), N))

    cld = cld_score(w)
    pruned = np.zeros(N, dtype=bool)
    weights = np.ones(N, dtype=np.float32)
    zeros = np.zeros(bins, dtype=np.int64)

    def nothing(reason: str, density: IdealCLDDensity | None, ks: float = float("nan"),
                support: np.ndarray | None = None) -> D3PDecision:
        return D3PDecision(
            pruned=pruned, weights=weights, cld=cld, support=np.full(2, np.nan) if support is None else support,
            observed=zeros, expected=zeros.copy(), reason=reason, density=density,
            seconds=time.perf_counter() - start, fit_ks=ks, poor_fit=bool(ks > fit_threshold),
        )

    try:
        density = ideal_cld_density(w, quantile=quantile)
    except DegenerateWindowError as err:
        if err.kind == "non-finite":
            raise
        return nothing(f"{err}: nothing pruned", None)
    ks = fit_ks(cld, density)
    poor = bool(ks > fit_threshold)

    support = support_boundary(cld, density, bins)
    if support is None:
        return nothing(
            f"no fine bin of the observed CLD range expects >= 1 sample under the ideal "
            f"distribution (N={N}, bins={bins}): support empty, nothing pruned",
            density, ks,
        )
    a, b = support
    if poor and poor_fit == "keep_all":
        return nothing(
            f"poor fit (KS {ks:.3f} > {fit_threshold:g}) and --d3p_poor_fit keep_all: nothing pruned, no weights",
            density, ks, np.array([a, b], dtype=np.float64),
        )
    easy_mask = cld < a
    hard_mask = cld > b
    easy, hard = int(np.count_nonzero(easy_mask)), int(np.count_nonzero(hard_mask))
    tail_kept = hard if poor and poor_fit == "keep_tail" else 0
    inside = None if target_kept is None else max(int(target_kept) - tail_kept, 0)
    match = histogram_match(cld, density, support, bins, gen, target_kept=inside)
    if tail_kept:
        hard_mask = np.zeros(N, dtype=bool)
    pruned = easy_mask | hard_mask
    pruned |= match.trimmed
    weights = match.weights
    del easy_mask, hard_mask
    capped = 0
    if max_weight > 0:
        over = weights > np.float32(max_weight)
        capped = int(np.count_nonzero(over))
        weights[over] = np.float32(max_weight)

    restored = 0
    kept = N - int(np.count_nonzero(pruned))
    if kept < min_kept:
        cand = np.flatnonzero(pruned)
        c = cld[cand]
        dist = np.maximum(np.maximum(a - c, c - b), 0.0)
        order = np.lexsort((gen.random(cand.size), dist))  # by distance, random tie-break
        back = cand[order[: min_kept - kept]]
        pruned[back] = False
        weights[back] = 1.0  # restored samples come from trimmed/outside bins: weight 1 anyway
        restored = int(back.size)

    num_pruned = int(np.count_nonzero(pruned))
    return D3PDecision(
        pruned=pruned,
        weights=weights,
        cld=cld,
        support=np.array([a, b], dtype=np.float64),
        observed=match.observed,
        expected=match.expected,
        easy=easy,
        hard=hard,
        trimmed=int(np.count_nonzero(match.trimmed)),
        upweighted=match.upweighted,
        restored=restored,
        prune_ratio=num_pruned / N,
        seconds=time.perf_counter() - start,
        reason="",
        density=density,
        fit_ks=ks,
        poor_fit=poor,
        capped=capped,
        tail_kept=tail_kept,
        scale=match.scale,
    )
