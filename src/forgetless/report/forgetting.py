"""TI and BWT of a tuned run against the base: pure arithmetic on scores and paired per-item differences (the
definitions are in :mod:`forgetless.report.stage`'s docstring)."""

from __future__ import annotations

import math
from typing import Any

from forgetless.core.intervals import average_of_differences


def relative_change(tuned: float, base: float) -> float | None:
    """(tuned - base) / base; None when base == 0 (undefined, never a division by zero)."""
    return None if base == 0 else (tuned - base) / base


def forgetting_metrics(base: dict[str, float], tuned: dict[str, float], target: str,
                       lower_is_better: frozenset[str] = frozenset()) -> dict[str, Any]:
    """TI and BWT (relative and absolute) of ``tuned`` against ``base`` (task -> score).

    BWT averages the non-target tasks' primary measures: lower-is-better tasks and the
    sub-measures of a behaviour set (``gen:<source>:<metric>``, e.g. format compliance, which
    rises when a model answers with a bare "#### 12") are shown but not averaged.
    """
    notes = []
    ti = ti_abs = None
    if target in base and target in tuned:
        ti_abs = tuned[target] - base[target]
        ti = relative_change(tuned[target], base[target])
        if target in lower_is_better:  # e.g. held-out NLL: a drop is the improvement
            ti_abs, ti = -ti_abs, None if ti is None else -ti
            notes.append(f"TI on {target}: lower is better, so TI = (base - tuned) / base")
        if ti is None:
            notes.append(f"TI undefined: base score on {target} is 0")
    else:
        notes.append(f"TI undefined: target task {target} missing from base or tuned results")
    others = [t for t in base if t in tuned and t != target and t not in lower_is_better and not is_sub_measure(t)]
    unscored = [t for t in others if math.isnan(base[t]) or math.isnan(tuned[t])]  # no items: the score is NaN
    if unscored:
        notes.append(f"BWT leaves out {', '.join(unscored)}: no items scored")
        others = [t for t in others if t not in unscored]
    rel = {t: relative_change(tuned[t], base[t]) for t in others}
    defined = [t for t in others if rel[t] is not None]
    undefined = [t for t in others if rel[t] is None]
    if undefined:
        notes.append(f"BWT averages {len(defined)} of {len(others)} non-target "
                     f"tasks: base score 0 on {', '.join(undefined)}")
    bwt = sum(rel[t] for t in defined) / len(defined) if defined else None
    bwt_abs = sum(tuned[t] - base[t] for t in others) / len(others) if others else None
    return {"TI": ti, "TI_abs": ti_abs, "BWT": bwt, "BWT_abs": bwt_abs, "bwt_tasks": defined,
            "bwt_undefined": undefined, "relative": rel, "notes": notes}


def is_sub_measure(task: str) -> bool:
    """``gen:<source>:<metric>``: a detail of a behaviour set whose primary record is ``gen:<source>``."""
    return task.startswith("gen:") and task.count(":") >= 2


def point_intervals(row: dict, report: dict, relative: bool) -> tuple[tuple, tuple]:
    """(TI, BWT) of one tuned row as (value, lo, hi) each, from the paired per-item differences against the base:
    TI's interval is the target's; BWT's averages those of its tasks (:func:`average_of_differences`); relative
    values divide by the base score (taken as fixed). A missing interval is (value, nan, nan)."""
    m, base = row["metrics"], next(r for r in report["rows"] if r["is_base"])["tasks"]
    kx, ky = ("TI", "BWT") if relative else ("TI_abs", "BWT_abs")

    def scaled(task: str) -> tuple[float, float, float]:
        d = row["paired"].get(task)
        if not d or d.get("ci95") is None:
            return (math.nan,) * 3
        sign = -1.0 if task in report["lower_is_better"] else 1.0
        lo, hi = sorted((sign * d["ci95"][0], sign * d["ci95"][1]))
        div = abs(base[task]["score"]) if relative and base.get(task) and base[task]["score"] else 1.0
        return sign * d["mean"] / div, lo / div, hi / div

    tx = scaled(report["target"])
    by = average_of_differences([scaled(t) for t in m.get("bwt_tasks", [])]) if m.get("bwt_tasks") else (math.nan,) * 3
    return (m[kx], tx[1], tx[2]), (m[ky], by[1], by[2])
