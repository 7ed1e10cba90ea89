"""Confidence intervals for scores on small subsets, as pure functions of plain numbers.

* A proportion (an accuracy) gets a Wilson score interval: it stays inside [0, 1] and is sane
  at 150 items and accuracies near chance, where the normal interval is not.
* A mean of per-item values (KL, NLL) gets the normal interval ``mean ± 1.96·sd/√n``
  (:func:`mean_interval`), or a percentile bootstrap (:func:`score_interval` in ``eval``).
* A change between two evaluations of the *same items* gets a seeded paired bootstrap: items are
  resampled with their two scores together, which removes the between-item variance (most of
  it), so a drop of a few points at 150 items can be told from noise where two unpaired
  intervals could not. Every paired difference here is ``first − second``:
  ``paired_difference(tuned, base)`` is tuned − base.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; (nan, nan) when n == 0 (nothing measured).

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 (or n) successes the bound is exactly 0 (or 1); rounding would leave 3e-17, which
    # reads as "above the floor" to a strict comparison.
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; (nan, nan) for no values."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    alpha = (1 - level) / 2
    return _percentile(means, alpha), _percentile(means, 1 - alpha)


def score_interval(scores: Sequence[float]) -> tuple[float, float]:
    """Wilson when every score is 0 or 1 (accuracy), else bootstrap of the mean."""
    if all(s in (0.0, 1.0) for s in scores):
        return wilson_interval(sum(scores), len(scores))
    return bootstrap_interval(scores)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, lo, hi): normal interval of the mean; the interval is a point when n == 1."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean, mean)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (mean, mean - half, mean + half)


def mean_difference(diffs: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """``{"n", "mean", "ci95"}`` of per-item paired differences, with the paired bootstrap 95% interval.

    Mean and ci95 are None when there is no item.

    >>> mean_difference([0.0, 1.0])  # resamples have means 0, 1/2, 1 (chances 1/4, 1/2, 1/4)
    {'n': 2, 'mean': 0.5, 'ci95': [0.0, 1.0]}
    """
    if not diffs:
        return {"n": 0, "mean": None, "ci95": None}
    lo, hi = bootstrap_interval(list(diffs), n_boot, seed)
    return {"n": len(diffs), "mean": sum(diffs) / len(diffs), "ci95": [lo, hi]}


def paired_difference(a: dict[str, float], b: dict[str, float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of ``a[id] - b[id]`` (e.g. tuned − base) over the ids both have: :func:`mean_difference`."""
    common = sorted(set(a) & set(b))
    return mean_difference([a[i] - b[i] for i in common], n_boot, seed)


def average_of_differences(diffs: Sequence[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(mean, lo, hi): average of independent per-task differences ``(mean, lo, hi)`` (BWT over tasks).

    Each task's standard error is read back from its 95% interval as ``(hi − lo) / (2·1.96)``
    (exact for a normal interval, the matching normal width for a bootstrap one); tasks are
    independent, so ``se(avg) = sqrt(sum se_i^2) / T``. Tasks without a value (nan) are left out.
    """
    diffs = [d for d in diffs if not math.isnan(d[0])]
    if not diffs:
        return (math.nan, math.nan, math.nan)
    t = len(diffs)
    mean = sum(d[0] for d in diffs) / t
    se = math.sqrt(sum(((d[2] - d[1]) / (2 * Z95)) ** 2 for d in diffs)) / t
    return (mean, mean - Z95 * se, mean + Z95 * se)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``.

    Under "no difference" each of the ``n = b + c`` discordant items goes either way with
    probability 1/2: ``p = min(1, 2·P(Binomial(n, 1/2) <= min(b, c)))``; 1 when n == 0.

    >>> round(mcnemar_exact(8, 0), 4), round(mcnemar_exact(9, 0), 4), mcnemar_exact(0, 0)
    (0.0078, 0.0039, 1.0)
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
