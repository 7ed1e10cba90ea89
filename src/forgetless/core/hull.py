"""A recipe's learning-forgetting curve at matched gain: the upper concave hull of its measured models.

Each point is a *real* model (a trained adapter, or one scaled by WiSE-FT's alpha, and the base at
gain 0) with its (target gain, retention). A random mixture of two models (answer with model A
with probability w) reaches every point of the segment between them, so the best retention a
recipe can offer at gain g is the upper concave hull of its points at g (its least concave
majorant). Sorting points by measured gain and joining them in order is not a curve: gain is
noisy, and a line through noisy points zig-zags.

Ties in gain are resolved one way: of points with equal gain the one of higher retention is kept
(the others lie under the hull). A point on the segment between two hull points is dropped (the
hull is the same line without it). The hull is never extrapolated: outside [lowest gain, highest
gain] it has no value.

>>> upper_hull([(0.0, 1.0), (0.1, 0.5), (0.2, 0.8)])  # (0.1, 0.5) lies under the chord from 1.0 to 0.8
[(0.0, 1.0), (0.2, 0.8)]
>>> value_on_hull([(0.0, 1.0), (0.5, 0.5)], 0.25)
0.75
"""

from __future__ import annotations

import math
from typing import Sequence


def upper_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper concave hull of (gain, retention) points, by gain (Andrew's monotone chain, upper half).

    NaN points are left out; of equal gains the highest retention is kept."""
    best: dict[float, float] = {}
    for g, r in points:
        if math.isnan(g) or math.isnan(r):
            continue
        best[g] = max(r, best.get(g, -math.inf))
    hull: list[tuple[float, float]] = []
    for p in sorted(best.items()):
        # drop the last point while it is on or under the chord from the one before it to p
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    """z of (a - o) x (b - o): >= 0 when a is on or under the line from o to b (gains increasing)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def value_on_hull(hull: Sequence[tuple[float, float]], gain: float) -> float | None:
    """Retention on the hull at ``gain``, linear between hull points; None outside the hull's range."""
    if not hull or math.isnan(gain) or gain < hull[0][0] or gain > hull[-1][0]:
        return None
    for (g0, r0), (g1, r1) in zip(hull, hull[1:]):
        if g0 <= gain <= g1:
            return r0 + (r1 - r0) * (gain - g0) / (g1 - g0)
    return hull[0][1]  # a hull of one point, at exactly that gain


def retention_at_gain(points: Sequence[tuple[float, float]], gain: float) -> float:
    """The hull of ``points`` at ``gain``; NaN where it does not reach (a bootstrap replicate then counts as
    not reaching it)."""
    value = value_on_hull(upper_hull(points), gain)
    return math.nan if value is None else value
