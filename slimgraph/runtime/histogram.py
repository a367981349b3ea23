"""Streaming statistics of one tensor, and the range calibrators that read them.

A `TensorStats` sees a tensor batch by batch and keeps a fixed amount of state: exact min/max, a
moving average of per-batch min/max, and a histogram of fixed bin count whose range grows by
re-binning (merging) when new values fall outside it. Memory therefore does not depend on the
number of samples (docs/architecture.md, "Runtime"), unlike calibrators that keep every value.

Calibrators turn the statistics into a clipping range `(rmin, rmax)`:
- `minmax`: the exact range; `moving-average`: the average of per-batch min/max;
- `percentile`: the two-sided percentile (default 99.99) of the histogram;
- `entropy`: the range whose quantized histogram is closest in KL divergence to the clipped one
  (TensorRT's method, generalized to asymmetric ranges by shrinking both ends towards zero);
- `mse`: the range minimizing the expected squared quantization error (rounding + clipping).
All of them keep zero inside the range and work on constant and tiny ranges; the scale and zero
point of a range come from `runtime.quant_math.quant_params`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from slimgraph.runtime.quant_math import RANGE_METHODS

__all__ = ["METHODS", "TensorStats", "calibrated_range"]

METHODS = RANGE_METHODS

_BINS = 2048
_GROWTH = 1.5  # a histogram whose range must grow grows at least this much, so re-binning is rare
_EMA = 0.01  # weight of a new batch in the moving average of min/max


@dataclass
class TensorStats:
    """Streaming statistics of one tensor (fixed memory).

    Args:
        histogram: also keep a histogram (percentile, entropy and MSE need it).
        bins: histogram bins.
    """

    histogram: bool = True
    bins: int = _BINS
    count: int = 0
    zeros: int = 0  # exact zeros (after a Relu, often half the values): representable exactly
    min: float = math.inf
    max: float = -math.inf
    ema_min: float = math.nan
    ema_max: float = math.nan
    lo: float = 0.0
    hi: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def update(self, values: np.ndarray, bounds: tuple[float, float] | None = None) -> None:
        """Add a batch of finite values (the caller checks); `bounds`: their min and max."""
        data = np.asarray(values, dtype=np.float32).ravel()
        if data.size == 0:
            return
        batch_min, batch_max = bounds if bounds is not None else (float(data.min()),
                                                                  float(data.max()))
        self._add_range(batch_min, batch_max, data.size)
        if self.histogram:
            self.zeros += int(np.count_nonzero(data == 0))
            self._add_to_histogram(data, batch_min, batch_max)

    def update_bounds(self, low: float, high: float, size: int) -> None:
        """Add a batch known only by its finite min, max and element count (no histogram)."""
        if self.histogram:
            raise ValueError("a histogram needs the values, not only their bounds")
        if size:
            self._add_range(low, high, size)

    def _add_range(self, low: float, high: float, size: int) -> None:
        if self.count == 0:
            self.ema_min, self.ema_max = low, high
        else:
            self.ema_min += _EMA * (low - self.ema_min)
            self.ema_max += _EMA * (high - self.ema_max)
        self.min, self.max = min(self.min, low), max(self.max, high)
        self.count += size

    def _add_to_histogram(self, data: np.ndarray, batch_min: float, batch_max: float) -> None:
        if self.counts.size == 0:
            self.lo, self.hi = batch_min, _min_width_above(batch_min, batch_max)
            self.counts = np.zeros(self.bins)
        elif batch_min < self.lo or batch_max > self.hi:
            self._grow(batch_min, batch_max)
        hist, _ = np.histogram(data, bins=self.bins, range=(self.lo, self.hi))
        self.counts += hist

    def _grow(self, batch_min: float, batch_max: float) -> None:
        """Re-bin onto a wider range that holds the new values (counts spread linearly)."""
        width = self.hi - self.lo
        lo, hi = min(self.lo, batch_min), max(self.hi, batch_max)
        hi = _min_width_above(lo, hi)
        extra = max(0.0, _GROWTH * width - (hi - lo))
        if batch_min < self.lo:
            lo -= extra if batch_max <= self.hi else extra / 2
        if batch_max > self.hi:
            hi += extra if batch_min >= self.lo else extra / 2
        new_edges = np.linspace(lo, hi, self.bins + 1)
        self.counts = np.diff(self.cdf(new_edges))
        self.lo, self.hi = lo, hi

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def cdf(self, points: np.ndarray) -> np.ndarray:
        """Number of values below each point (uniform within a bin)."""
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        return np.interp(points, self.edges(), cumulative, left=0.0, right=cumulative[-1])

    def quantile(self, q: float) -> float:
        """The value below which a share q of the values lies (from the histogram)."""
        cumulative = np.concatenate([[0.0], np.cumsum(self.counts)])
        total = cumulative[-1]
        if total <= 0:
            return 0.0
        value = float(np.interp(q * total, cumulative, self.edges()))
        return min(max(value, self.min), self.max)


def _min_width_above(lo: float, hi: float) -> float:
    """An upper edge that gives [lo, hi] float32-distinct bin edges (a constant tensor has zero
    width; numpy's histogram refuses ranges narrower than its bins can resolve)."""
    magnitude = max(abs(lo), abs(hi), 1e-30)
    return max(hi, lo + magnitude * 2.0**-8)


def calibrated_range(
    stats: TensorStats,
    method: str,
    *,
    qmin: int = 0,
    qmax: int = 255,
    percentile: float = 99.99,
) -> tuple[float, float]:
    """The clipping range a calibrator picks, always containing zero.

    Args:
        stats: the tensor's statistics.
        method: one of `METHODS`.
        qmin, qmax: the integer grid the range will map to (entropy and MSE need its size).
        percentile: for `percentile`, the share of values kept on each side, in percent.
    """
    if stats.count == 0:
        return 0.0, 0.0
    rmin, rmax = min(stats.min, 0.0), max(stats.max, 0.0)
    if method == "minmax":
        return rmin, rmax
    if method == "moving-average":
        return min(stats.ema_min, 0.0), max(stats.ema_max, 0.0)
    if rmax - rmin <= 0 or not stats.histogram or stats.counts.size == 0:
        return rmin, rmax
    if method == "percentile":
        tail = (100.0 - percentile) / 100.0
        low = stats.quantile(tail) if stats.min < 0 else 0.0
        high = stats.quantile(1.0 - tail) if stats.max > 0 else 0.0
        return min(low, 0.0), max(high, 0.0)
    if method in ("entropy", "mse"):
        objective = _kl_divergence if method == "entropy" else _expected_squared_error
        return _search_range(_nonzero_part(stats), rmin, rmax, qmax - qmin, objective)
    raise ValueError(f"unknown calibration method '{method}'")


def _search_range(
    stats: TensorStats, rmin: float, rmax: float, levels: int, objective
) -> tuple[float, float]:  # noqa: ANN001
    """Minimize `objective(stats, lo, hi, levels)` by shrinking each end towards zero in turn
    (coordinate descent, two sweeps), keeping the range at least `levels` histogram bins wide."""
    bin_width = (stats.hi - stats.lo) / stats.bins
    lo, hi = rmin, rmax
    factors = np.linspace(1.0, 1.0 / 64, 128)
    for _ in range(2):
        if hi > 0:
            candidates = [rmax * f for f in factors if rmax * f - lo >= levels * bin_width]
            if candidates:
                hi = min(candidates, key=lambda h: objective(stats, lo, h, levels))
        if lo < 0:
            candidates = [rmin * f for f in factors if hi - rmin * f >= levels * bin_width]
            if candidates:
                lo = min(candidates, key=lambda v: objective(stats, v, hi, levels))
    return float(lo), float(hi)


def _nonzero_part(stats: TensorStats) -> TensorStats:
    """The statistics without the exact zeros (they quantize without error, and a spike of them
    at one bin would otherwise decide the KL search: it favours ranges as small as possible)."""
    if stats.zeros == 0 or not stats.lo <= 0.0 <= stats.hi:
        return stats
    counts = stats.counts.copy()
    index = min(int((0.0 - stats.lo) / (stats.hi - stats.lo) * stats.bins), stats.bins - 1)
    counts[index] = max(0.0, counts[index] - stats.zeros)
    if counts.sum() <= 0:
        return stats
    return TensorStats(histogram=True, bins=stats.bins, count=stats.count - stats.zeros,
                       min=stats.min, max=stats.max, lo=stats.lo, hi=stats.hi, counts=counts)


def _kl_divergence(stats: TensorStats, lo: float, hi: float, levels: int) -> float:
    """KL(P || Q): P the histogram clipped to [lo, hi] at native resolution (outliers added to the
    edge bins), Q the same after merging into `levels` quantization bins (mass spread uniformly
    over each level's non-empty bins), as in TensorRT's entropy calibration."""
    bin_width = (stats.hi - stats.lo) / stats.bins
    # Native resolution, but never more than twice the histogram's bins (a narrow histogram
    # inside a wide clipping range, e.g. a constant, would otherwise ask for millions).
    n = max(levels, min(int(round((hi - lo) / bin_width)), 2 * stats.bins))
    edges = np.linspace(lo, hi, n + 1)
    cumulative = stats.cdf(edges)
    inside = np.diff(cumulative)
    p = inside.copy()
    p[0] += cumulative[0]
    p[-1] += stats.counts.sum() - cumulative[-1]
    # Q quantizes the clipped histogram without the outliers: clipping is what KL then charges.
    group = (np.arange(n) * levels) // n
    mass = np.bincount(group, weights=inside, minlength=levels)
    occupied = np.bincount(group, weights=(inside > 0).astype(float), minlength=levels)
    q = np.where(inside > 0, mass[group] / np.maximum(occupied[group], 1), 0.0)
    keep = p > 0
    if q.sum() <= 0:
        return math.inf
    p_norm = p[keep] / p.sum()
    q_norm = np.maximum(q[keep] / q.sum(), 1e-12)
    return float(np.sum(p_norm * np.log(p_norm / q_norm)))


def _expected_squared_error(stats: TensorStats, lo: float, hi: float, levels: int) -> float:
    """Rounding noise (scale^2 / 12 per value inside the range) plus clipping error outside."""
    scale = (hi - lo) / levels
    edges = stats.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    below = centers < lo
    above = centers > hi
    inside = ~(below | above)
    rounding = stats.counts[inside].sum() * scale**2 / 12
    clipping = (stats.counts[below] * (centers[below] - lo) ** 2).sum()
    clipping += (stats.counts[above] * (centers[above] - hi) ** 2).sum()
    return float(rounding + clipping)
