"""Intervals for retention measures: pure functions of plain numbers.

* A proportion (MC accuracy) gets a Wilson score interval: it stays inside [0, 1] and is sane
  at 150 items and accuracies near chance, where the normal interval is not.
* A mean of per-item values (KL, NLL) gets the normal interval ``mean ± 1.96·sd/√n``.
* A change between two evaluations of the *same items* (tuned − base) gets the normal interval
  of the mean paired difference: pairing removes the between-item variance, which is most of
  it, so a drop of a few points at 150 items can be told from noise where two unpaired Wilson
  intervals could not.
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``; (nan, nan) when n == 0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


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


def paired_difference(tuned: dict[str, float], base: dict[str, float]) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n) of ``tuned[id] - base[id]`` over the ids both have."""
    ids = sorted(set(tuned) & set(base))
    mean, lo, hi = mean_interval([tuned[i] - base[i] for i in ids])
    return (mean, lo, hi, len(ids))


def average_of_differences(diffs: Sequence[tuple[float, float, float, int]]) -> tuple[float, float, float]:
    """Average of independent per-task differences with its interval (BWT over tasks).

    Each task's standard error is read back from its interval; tasks are independent, so
    ``se(avg) = sqrt(sum se_i^2) / T``.
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
