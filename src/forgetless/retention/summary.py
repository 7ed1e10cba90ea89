"""Retention columns of the report: BWT, MC retention, drift and target gain, with 95% intervals.

Given the base run's records and each method's records (directories written by
:func:`forgetless.retention.stage.run_retention` or the ``evaluate_*`` functions). Shared by the report and by the
training probes (:mod:`forgetless.train.probe`):

* **BWT** (accuracy): mean over the accuracy tasks *where the base is above chance* (the lower
  end of its 95% interval is above chance; above 0 when no chance is given) of the paired
  per-item change ``tuned - base`` (a paired bootstrap interval per task). Tasks at the floor
  are listed but left out: nothing there can be seen to drop. MC tasks use olmo-eval's primary metric (acc or acc_norm).
* **MC retention**: ``1 + BWT_mc / mean(base - chance)`` over the above-chance MC tasks, i.e. the
  share of the base's above-chance skill that is left (1 = nothing lost); its interval is
  BWT's interval mapped the same way (the base margin taken as fixed).
* **Drift**: mean over the non-target sources of KL(base‖tuned), plus KL(tuned‖base) and top-1
  agreement; intervals from the per-source intervals (sources independent).
* **Target gain**: minus the change of held-out NLL on the kept kind (and the masked kind
  beside it), and any target accuracy task named by the caller.
"""

from __future__ import annotations

import math
from pathlib import Path

from forgetless.core.intervals import average_of_differences, paired_difference
from forgetless.retention.olmo_tasks import VARIANTS, primary_metric
from forgetless.retention.records import list_tasks, read_task

_ACCURACY_METRICS = ("acc", "acc_norm", "acc_per_token", "accuracy", "pass@1", "exact_match")


def accuracy_tasks(tasks: list[str]) -> list[str]:
    """One record per accuracy task: MC tasks by their primary metric, others as named."""
    out = []
    for task in tasks:
        if task.startswith(("drift:", "heldout:", "gen:")):
            continue
        head, _, metric = task.partition(":")
        if head in VARIANTS:
            want = primary_metric(head)
            if (metric or "acc") == want:
                out.append(task)
        elif not metric:
            out.append(task)
    return out


def above_chance(record: dict) -> bool:
    """The lower end of the 95% interval is above chance (a tolerance of 1e-9 absorbs rounding in
    records written before Wilson bounds were exact at 0 successes)."""
    return record["ci95"][0] > (record.get("chance") or 0.0) + 1e-9


def _paired(run_items: dict, base_items: dict) -> tuple[float, float, float, int]:
    """(mean, lo, hi, n) of the per-item change tuned − base (paired bootstrap); nan with no shared item."""
    d = paired_difference({k: v["score"] for k, v in run_items.items()}, {k: v["score"] for k, v in base_items.items()})
    if not d["n"]:
        return (math.nan, math.nan, math.nan, 0)
    return (d["mean"], *d["ci95"], d["n"])


def summarize_run(base_dir: str | Path, run_dir: str | Path, target_task: str | None = None) -> dict:
    """The report's retention columns for one method against the base."""
    base_tasks, run_tasks = set(list_tasks(base_dir)), set(list_tasks(run_dir))
    rows, bwt_diffs, mc_diffs, margins = {}, [], [], []
    for task in accuracy_tasks(sorted(base_tasks & run_tasks)):
        if task == target_task:
            continue
        base_rec, base_items = read_task(base_dir, task)
        run_rec, run_items = read_task(run_dir, task)
        if base_rec["metric"] not in _ACCURACY_METRICS or not base_rec["higher_is_better"]:
            continue
        diff = _paired(run_items, base_items)
        counted = above_chance(base_rec)
        rows[task] = {"base": base_rec["score"], "tuned": run_rec["score"], "change": diff[0],
                      "change_ci95": [diff[1], diff[2]], "n": diff[3], "above_chance": counted,
                      "chance": base_rec.get("chance")}
        if counted:
            bwt_diffs.append(diff[:3])
            if task.split(":")[0] in VARIANTS:
                mc_diffs.append(diff[:3])
                margins.append(base_rec["score"] - (base_rec.get("chance") or 0.0))
    summary = {"tasks": rows, "bwt": _triple(average_of_differences(bwt_diffs)), "bwt_tasks": len(bwt_diffs)}
    mc_bwt = average_of_differences(mc_diffs)
    margin = sum(margins) / len(margins) if margins else math.nan
    summary["mc_retention"] = _triple(tuple(1 + v / margin for v in mc_bwt)) if margins else _triple((math.nan,) * 3)
    summary["drift"] = {}
    for metric in ("", ":kl_tuned_base", ":top1_agreement", ":answer_nll_change"):
        found = [read_task(run_dir, t)[0] for t in sorted(run_tasks)
                 if t.startswith("drift:") and (t.count(":") == 1 if not metric else t.endswith(metric))]
        name = metric.lstrip(":") or "kl_base_tuned"
        summary["drift"][name] = _triple(average_of_differences([(r["score"], *r["ci95"]) for r in found]))
        summary["drift"][name]["sources"] = [r["task"] for r in found]
    summary["target"] = _target_columns(run_dir, run_tasks, base_dir, target_task)
    summary["behaviour"] = _behaviour_columns(base_dir, run_dir, sorted(base_tasks & run_tasks))
    for metric in ("working_kept", "did_what_asked"):  # mean over the non-target sources measuring it
        found = [c for t, c in summary["behaviour"].items() if c["metric"] == metric and t != target_task]
        summary[metric] = _triple(average_of_differences([(c["tuned"], *c["tuned_ci95"]) for c in found])) if found \
            else _triple((math.nan,) * 3)
    return summary


def _behaviour_columns(base_dir, run_dir, tasks: list[str]) -> dict:
    """Every ``gen:`` record: base and tuned score, and the paired change tuned − base."""
    out = {}
    for task in tasks:
        if not task.startswith("gen:"):
            continue
        base_rec, base_items = read_task(base_dir, task)
        run_rec, run_items = read_task(run_dir, task)
        m, lo, hi, n = _paired(run_items, base_items)
        out[task] = {"metric": run_rec["metric"], "higher_is_better": run_rec["higher_is_better"],
                     "base": base_rec["score"], "tuned": run_rec["score"], "tuned_ci95": run_rec["ci95"],
                     "score": m, "ci95": [lo, hi], "n": n, "chance": run_rec.get("chance"),
                     "base_above_floor": above_chance(base_rec) if run_rec["metric"] == "accuracy" else None,
                     **{k: base_rec.get("settings", {}).get(k) for k in ("max_new_tokens", "base_finish_rate")},
                     "finish_rate": run_rec.get("settings", {}).get("finish_rate")}
    return out


def _target_columns(run_dir, run_tasks, base_dir, target_task) -> dict:
    out = {}
    for task in sorted(run_tasks):
        if task.startswith("heldout:"):
            rec = read_task(run_dir, task)[0]
            s = rec["settings"]
            # Gain is a *decrease* of NLL: report -change so that higher is better.
            out[f"gain_{s['kind']}"] = {"score": -s["change"], "ci95": [-s["change_ci95"][1], -s["change_ci95"][0]],
                                        "nll": rec["score"], "base_nll": s["base_score"]}
    if target_task and target_task in run_tasks and target_task in set(list_tasks(base_dir)):
        (base_rec, base_items), run_items = read_task(base_dir, target_task), read_task(run_dir, target_task)[1]
        m, lo, hi, n = _paired(run_items, base_items)
        if not base_rec.get("higher_is_better", True):  # e.g. held-out NLL: a drop is the gain
            m, lo, hi = -m, -hi, -lo
        out["gain_target"] = {"score": m, "ci95": [lo, hi], "n": n, "task": target_task}
    return out


def _triple(values) -> dict:
    mean, lo, hi = values
    return {"score": mean, "ci95": [lo, hi]}
