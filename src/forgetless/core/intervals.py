"""Confidence intervals for scores on small subsets: Wilson for accuracies, bootstrap otherwise,
and a paired bootstrap for the difference of two models on the same items. Pure functions."""

from __future__ import annotations

import math
import random
from typing import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when n == 0.

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
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


def paired_difference(base: dict[str, float], tuned: dict[str, float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of tuned - base over the item ids both have, with a paired bootstrap 95% interval."""
    common = sorted(set(base) & set(tuned))
    diffs = [tuned[i] - base[i] for i in common]
    if not diffs:
        return {"n": 0, "mean": None, "ci95": None}
    lo, hi = bootstrap_interval(diffs, n_boot, seed)
    return {"n": len(diffs), "mean": sum(diffs) / len(diffs), "ci95": [lo, hi]}
