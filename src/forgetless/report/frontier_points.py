"""The frontier's points, read from the records the stages wrote: the base, one point per finished model (its
retention records, :func:`forgetless.retention.summary.summarize_run`) and one per probe step (``probes.jsonl``),
with the per-item and per-seed scores behind them. :mod:`forgetless.report.frontier` draws and compares them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from forgetless.train.probe import PROBES_FILE, read_probes
from forgetless.retention.records import list_tasks, read_task
from forgetless.retention.summary import summarize_run

NAN = float("nan")
# (measure, higher is better) shown per point
MEASURES = (("mc_retention", True), ("did_what_asked", True), ("working_kept", True), ("top1_agreement", True),
            ("kl_base_tuned", False), ("kl_tuned_base", False))
OWN = ("mc_retention", "working_kept", "did_what_asked")  # summary columns of their own; the rest are drift's


def _score_and_ci(d: dict | None) -> tuple[float, list[float] | None]:
    if not d:
        return NAN, None
    return d["score"], d.get("ci95")


def _entropy_change(run_dir: Path) -> float:
    vals = [read_task(run_dir, t)[0]["settings"].get("details", {}).get("entropy_change", {}).get("score")
            for t in list_tasks(run_dir) if t.startswith("drift:") and t.count(":") == 1]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else NAN


def final_point(base_dir: Path, run_dir: Path, gain: str, train_dir: Path | None, target: str | None = None) -> dict:
    """One learning-rate point from a finished model's retention records."""
    s = summarize_run(base_dir, run_dir, target_task=target)
    point = {"gain": _score_and_ci(s["target"].get(gain))[0], "gain_ci95": _score_and_ci(s["target"].get(gain))[1]}
    for name, _ in MEASURES:
        point[name], point[f"{name}_ci95"] = _score_and_ci(s[name] if name in OWN else s["drift"].get(name))
    for kind in ("gain_kept", "gain_masked", "gain_all"):
        point[kind] = _score_and_ci(s["target"].get(kind))[0]
    point["entropy_change"] = _entropy_change(run_dir)
    diag = train_dir / "diagnostics.json" if train_dir else None
    point["dw_frobenius"] = json.loads(diag.read_text())["total_frobenius"] if diag and diag.is_file() else NAN
    return point


def seed_scores(run_dir: Path, retention: str, target: str | None) -> dict[str, list[float]]:
    """Per-seed scores of a pooled point: the retention measure's records and the target's (empty: one seed)."""
    out = {}
    for task in list_tasks(run_dir):
        record = read_task(run_dir, task)[0]
        if "seeds" in record and (task == target or (task.startswith("gen:") and task.count(":") == 1)):
            out[task] = record["seeds"]
    return out


def probe_points(train_dir: Path, gain: str) -> list[dict]:
    """Points along one run from its ``probes.jsonl`` (step 0 left out: it is the base)."""
    out = []
    for row in read_probes(train_dir / PROBES_FILE):
        m = row["measures"]
        if row["step"] == 0 or gain not in m:
            continue
        point = {"step": row["step"], "gain": m[gain], "gain_ci95": m.get(f"{gain}_ci95")}
        for name, _ in MEASURES:
            point[name], point[f"{name}_ci95"] = m.get(name, NAN), m.get(f"{name}_ci95")
        point["dw_frobenius"] = m.get("dw_frobenius") or NAN
        out.append(point)
    return out


def item_scores(run_dir: Path, task: str) -> dict[str, float]:
    return {k: v["score"] for k, v in read_task(run_dir, task)[1].items() if not math.isnan(v["score"])}


def retention_items(run_dir: Path, retention: str, target: str | None) -> dict[str, float]:
    """Per-item scores behind a point's retention measure (``working_kept``, ``did_what_asked``: every non-target
    ``gen:<source>`` record of that metric, ids prefixed by the task); {} for measures without items here."""
    if retention not in ("working_kept", "did_what_asked"):
        return {}
    out = {}
    for task in list_tasks(run_dir):
        if task.startswith("gen:") and task.count(":") == 1 and task != target:
            record, items = read_task(run_dir, task)
            if record["metric"] == retention:
                out.update({f"{task}:{k}": v["score"] for k, v in items.items()
                            if v["score"] is not None and not math.isnan(v["score"])})
    return out


def base_point(base_dir: Path | None = None, target: str | None = None) -> dict:
    """The base itself: no gain, nothing lost, no drift (exact, so a zero-width interval); ``did_what_asked`` is the
    base's own share (from ``base_dir``), with its interval."""
    point = {"gain": 0.0, "gain_ci95": [0.0, 0.0], "label": "base"}
    for name, _ in MEASURES:
        v = 1.0 if name in ("mc_retention", "working_kept", "top1_agreement") else 0.0
        point[name], point[f"{name}_ci95"] = v, [v, v]
    if base_dir is not None:
        point["did_what_asked"], point["did_what_asked_ci95"] = _score_and_ci(
            summarize_run(base_dir, base_dir, target)["did_what_asked"])
    else:
        point["did_what_asked"], point["did_what_asked_ci95"] = NAN, None
    return point
