"""The learning–forgetting frontier: pure functions of plain numbers (no I/O).

A recipe that learns less also forgets less, so two recipes are compared at *matched target
gain*: each method's points (one per learning rate, or per probe step along a run) form a
curve of retention against target gain; the curve is interpolated linearly at the gains asked
for, and never extrapolated — a method whose curve does not reach a gain has no value there.

Every model is scored on the same items, so differences between two models are paired:
:func:`forgetless.core.intervals.paired_difference` resamples items (ids in both), and
:func:`verdict` says in a plain sentence whether the item count resolves the difference (its
95% interval excludes 0).

>>> interpolate_at_gain([(0.0, 1.0), (1.0, 0.8)], 0.5)
0.9
>>> interpolate_at_gain([(0.0, 1.0), (1.0, 0.8)], 1.5) is None
True
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def interpolate_at_gain(points: Sequence[tuple[float, float]], gain: float) -> float | None:
    """Value at ``gain`` on the polyline through ``points`` [(gain, value)], sorted by gain.

    None outside [first gain, last gain] (no extrapolation) or with no points. Points of
    equal gain are averaged (two runs that learned the same amount).
    """
    pts = [(g, v) for g, v in points if not (math.isnan(g) or math.isnan(v))]
    if not pts or math.isnan(gain):
        return None
    if any(b[0] < a[0] for a, b in zip(pts, pts[1:])):
        raise ValueError("points must be sorted by gain")
    if gain < pts[0][0] or gain > pts[-1][0]:
        return None
    at = [v for g, v in pts if g == gain]
    if at:
        return sum(at) / len(at)
    for (g0, v0), (g1, v1) in zip(pts, pts[1:]):
        if g0 < gain < g1:
            return v0 + (v1 - v0) * (gain - g0) / (g1 - g0)
    return None  # unreachable: gain is inside the range and not a point


def _curve(points: list[dict], key) -> list[tuple[float, float]]:
    return [(p["gain"], key(p)) for p in points]


def matched_gain_table(curves: dict[str, list[dict]], gains: Sequence[float]) -> dict[str, dict[float, dict | None]]:
    """Each method's retention at each matched gain, with its interval and the learning rate.

    ``curves``: method -> points ``{"gain", "retention", "ci95": [lo, hi] (optional),
    "lr": float (optional)}``. A point's interval bounds are interpolated like the value
    (an approximation: the bounds of neighbouring points, weighted by distance); the learning
    rate is interpolated on a log scale among the points that have one. Returns method -> gain -> ``{"retention",
    "ci95", "lr"}`` or None where the curve does not reach that gain.
    """
    table: dict[str, dict[float, dict | None]] = {}
    for method, points in curves.items():
        pts = sorted(points, key=lambda p: p["gain"])
        row: dict[float, dict | None] = {}
        for gain in gains:
            value = interpolate_at_gain(_curve(pts, lambda p: p["retention"]), gain)
            if value is None:
                row[gain] = None
                continue
            cell: dict[str, Any] = {"retention": value, "ci95": None, "lr": None}
            if all(p.get("ci95") for p in pts):
                cell["ci95"] = [interpolate_at_gain(_curve(pts, lambda p, i=i: p["ci95"][i]), gain) for i in (0, 1)]
            with_lr = [p for p in pts if p.get("lr")]  # the base point (lr 0) has none
            log_lr = interpolate_at_gain(_curve(with_lr, lambda p: math.log(p["lr"])), gain)
            cell["lr"] = math.exp(log_lr) if log_lr is not None else None
            row[gain] = cell
        table[method] = row
    return table


def common_gains(curves: dict[str, list[dict]], n: int = 3) -> list[float]:
    """``n`` evenly spaced gains inside the range every curve covers ([] when they don't overlap)."""
    ranges = [(min(p["gain"] for p in pts), max(p["gain"] for p in pts)) for pts in curves.values() if pts]
    if not ranges:
        return []
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if lo > hi:
        return []
    if n == 1 or lo == hi:
        return [lo]
    return [lo + (hi - lo) * k / (n - 1) for k in range(n)]


# Below this many paired items a percentile bootstrap interval is not trustworthy (with 2 items
# it is the range of 2 numbers), so no difference is called resolved.
MIN_ITEMS = 10


def resolved(result: dict) -> bool | None:
    """True when the interval excludes 0; None when there is nothing to judge (or too few items)."""
    if not result.get("n") or result.get("ci95") is None or result["n"] < MIN_ITEMS:
        return None
    lo, hi = result["ci95"]
    return lo > 0 or hi < 0


def verdict(a: str, b: str, measure: str, result: dict, higher_is_better: bool = True, digits: int = 3) -> str:
    """A plain sentence on the paired difference ``a - b`` in ``measure`` (from
    :func:`forgetless.core.intervals.paired_difference`)."""
    ok = resolved(result)
    if not result.get("n") or result.get("ci95") is None:
        return f"{measure}: {a} and {b} share no items; no comparison."
    mean, (lo, hi), n = result["mean"], result["ci95"], result["n"]
    if ok is None:
        return (f"{measure}: {a} − {b} = {mean:+.{digits}f} over only {n} paired items (fewer than {MIN_ITEMS}): "
                f"too few to judge; this ranks nothing.")
    head = f"{measure}: {a} − {b} = {mean:+.{digits}f} [95% {lo:+.{digits}f}, {hi:+.{digits}f}] over {n} paired items"
    if not ok:
        return f"{head}; the interval includes 0, so {n} items cannot tell {a} from {b} on {measure}."
    better = a if (mean > 0) == higher_is_better else b
    return f"{head}; the interval excludes 0: {better} is better on {measure} (resolved at {n} items)."


def items_at_gain(points: Sequence[dict], gain: float) -> dict[str, float] | None:
    """Item scores interpolated at ``gain`` along a curve: ``points`` [{"gain", "items": {id: score}}] sorted by gain.

    Between two neighbouring points with weight ``w = (gain - g0) / (g1 - g0)`` each item is
    ``(1 - w) * a + w * b`` (ids both points have), so a paired difference against another model's items at the same
    gain keeps the pairing. None outside the curve's range (no extrapolation).

    >>> items_at_gain([{"gain": 0.0, "items": {"x": 1.0}}, {"gain": 0.2, "items": {"x": 0.5}}], 0.05)
    {'x': 0.875}
    """
    pts = [p for p in points if not math.isnan(p["gain"])]
    if not pts or math.isnan(gain) or gain < pts[0]["gain"] or gain > pts[-1]["gain"]:
        return None
    same = [p["items"] for p in pts if p["gain"] == gain]
    if same:
        ids = set.intersection(*(set(s) for s in same))
        return {i: sum(s[i] for s in same) / len(same) for i in sorted(ids)}
    for p, q in zip(pts, pts[1:]):
        if p["gain"] < gain < q["gain"]:
            w = (gain - p["gain"]) / (q["gain"] - p["gain"])
            return {i: (1 - w) * p["items"][i] + w * q["items"][i] for i in sorted(set(p["items"]) & set(q["items"]))}
    return None
