"""The joint bootstrap behind the verdicts, and the tests read off it: pure numpy, seeded.

One *resample* is drawn once per report and shared by every comparison in it:

* each replicate draws the training draws with replacement (when a run has several: the
  examples a recipe trained on vary between draws, so they are a source of variation, and the
  same draw indices are used for every recipe: draw k of STM and draw k of SFT trained on the
  same examples), then, independently, the items of each measure (axis) with replacement, the
  same item indices for every model. Draws and items are crossed (every draw's model is scored on
  the same items), so they are resampled independently: a two-way (draw x item) bootstrap.
* A replicate is stored as counts: ``draws`` (B, D) and ``items[measure]`` (B, N). The mean of a
  (D, N) array X of per-draw, per-item scores in replicate b is ``draws[b] @ X @ items[b] / (D N)``.

Tests on a vector of replicate values ``reps`` (B,) of a difference ``d``:

* percentile interval at ``level``: the (1 - level)/2 and (1 + level)/2 quantiles, linear between
  order statistics (the rule of :func:`forgetless.core.intervals.bootstrap_interval`);
* two-sided p of "d = 0": ``min(1, 2 min(share(reps <= 0), share(reps >= 0)))``; the
  (1 - alpha) percentile interval excludes 0 exactly when this p < alpha (up to the quantile rule);
* TOST p of "|d| >= m": ``max(share(reps <= -m), share(reps >= m))``: both one-sided tests
  pass at alpha (p < alpha) when the (1 - 2 alpha) interval lies inside (-m, m);
* Holm's step-down adjustment of a family of p-values.

A replicate value may be NaN: a matched-gain comparison where a curve does not reach the gain.
Such a replicate counts *against* every claim: it sits below every value for the lower bound,
above every value for the upper bound, and on both sides of 0 and of ±m for the p-values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Resample:
    """Counts of the B replicates: ``draws`` (B, D), ``items`` measure -> (B, N_measure)."""

    draws: np.ndarray
    items: dict[str, np.ndarray]

    @property
    def n_boot(self) -> int:
        return int(self.draws.shape[0])


def draw_resample(n_draws: int, n_items: dict[str, int], n_boot: int, seed: int) -> Resample:
    """Multinomial counts for every replicate: draws first, then each measure in sorted order (one seeded stream).

    With one draw the draw axis is not resampled (its count is 1 in every replicate)."""
    rng = np.random.default_rng(seed)
    if n_draws > 1:
        draws = rng.multinomial(n_draws, [1 / n_draws] * n_draws, size=n_boot).astype(float)
    else:
        draws = np.ones((n_boot, max(n_draws, 1)))
    items = {}
    for name in sorted(n_items):
        n = n_items[name]
        items[name] = rng.multinomial(n, [1 / n] * n, size=n_boot).astype(float) if n else np.zeros((n_boot, 0))
    return Resample(draws, items)


def replicate_means(scores: np.ndarray, draws: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(B,) means of ``scores`` (D, N) under the counts ``draws`` (B, D) and ``items`` (B, N)."""
    d, n = scores.shape
    return np.einsum("bd,dn,bn->b", draws, scores, items) / (d * n)


def percentile_interval(reps: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of replicate values; NaN replicates count as -inf for the lower bound and +inf for the
    upper one (a curve that does not reach the gain can support no bound).

    >>> percentile_interval([0.0, 1.0, 2.0, 3.0, 4.0], 0.5)  # quantiles 0.25, 0.75 at positions 1 and 3
    (1.0, 3.0)
    """
    reps = np.asarray(reps, dtype=float)
    if reps.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    low = np.sort(np.where(np.isnan(reps), -np.inf, reps))
    high = np.sort(np.where(np.isnan(reps), np.inf, reps))
    return _quantile(low, tail), _quantile(high, 1 - tail)


def _quantile(sorted_values: np.ndarray, q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = float(sorted_values[lo]), float(sorted_values[hi])
    if lo == hi or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        return a if pos - lo < 0.5 else b  # no line between a finite value and an infinity
    return a + (b - a) * (pos - lo)


def p_two_sided(reps: Sequence[float]) -> float:
    """Bootstrap p of "the difference is 0": twice the smaller share of replicates on either side (0 counts on
    both sides; NaN replicates count on both sides).

    >>> p_two_sided([-1.0, 1.0, 2.0, 3.0])  # 1 of 4 at or below 0
    0.5
    """
    reps = np.asarray(reps, dtype=float)
    if reps.size == 0:
        return math.nan
    unknown = np.isnan(reps)
    below = np.mean((reps <= 0) | unknown)
    above = np.mean((reps >= 0) | unknown)
    return float(min(1.0, 2 * min(below, above)))


def p_tost(reps: Sequence[float], margin: float) -> float:
    """Two one-sided tests of "|difference| >= margin": the larger of the shares at or beyond -margin and +margin.

    >>> p_tost([-0.3, 0.0, 0.1, 0.2], 0.25)  # 1 of 4 at or below -0.25, 0 of 4 at or above +0.25
    0.25
    """
    reps = np.asarray(reps, dtype=float)
    if reps.size == 0:
        return math.nan
    unknown = np.isnan(reps)
    return float(max(np.mean((reps <= -margin) | unknown), np.mean((reps >= margin) | unknown)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: the i-th smallest p (1-based) is multiplied by
    k - i + 1, a running maximum keeps the order, and nothing exceeds 1. NaN (no test) stays NaN and does not count
    in k.

    >>> holm([0.01, 0.04, 0.03])  # sorted 0.01, 0.03, 0.04 -> 0.03, 0.06, max(0.06, 0.04) = 0.06
    [0.03, 0.06, 0.06]
    """
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    k = len(order)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p))
        out[i] = round(running, 12)
    return out


def holm_levels(p_values: Sequence[float], alpha: float) -> list[float]:
    """The interval level Holm's step-down gives each test: 1 - alpha / (k - rank) for the test of 0-based rank
    ``rank`` among the k p-values (smallest first); NaN for no test.

    >>> [round(x, 4) for x in holm_levels([0.01, 0.04, 0.03], 0.05)]
    [0.9833, 0.95, 0.975]
    """
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    out = [math.nan] * len(p_values)
    for rank, (_, i) in enumerate(order):
        out[i] = 1 - alpha / (len(order) - rank)
    return out
