"""Retention columns of the report, as a markdown table and a plot; the columns themselves are computed by
:func:`forgetless.retention.summary.summarize_run` (re-exported here)."""

from __future__ import annotations

import math
from pathlib import Path

from forgetless.report.cells import cell
from forgetless.retention.summary import above_chance, accuracy_tasks, summarize_run  # noqa: F401  (re-exported)


def _scored(record: dict) -> str:
    """A summary record ``{"score", "ci95"}`` as a signed cell with its interval."""
    return cell(record["score"], record["ci95"], signed=True)


def markdown_table(summaries: dict[str, dict]) -> str:
    """One row per method: target gain, working kept, BWT, MC retention, drift, NLL gains by kind.

    The held-out NLL kinds lean by construction (the kept kind toward STM, the masked kind toward
    ground truth); the column names say so.
    """
    head = ("| method | target gain (paired) | working kept | BWT (acc, above-chance tasks) | MC retention "
            "| KL(base‖tuned) | KL(tuned‖base) | top-1 agree | gain kept-kind NLL (favours STM) "
            "| gain masked-kind NLL (favours ground truth) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    missing = {"score": math.nan, "ci95": [math.nan, math.nan]}
    for name, s in summaries.items():
        t = s["target"]
        lines.append("| " + " | ".join([
            name, _scored(t.get("gain_target", missing)), _scored(s.get("working_kept", missing)), _scored(s["bwt"]),
            _scored(s["mc_retention"]), _scored(s["drift"]["kl_base_tuned"]), _scored(s["drift"]["kl_tuned_base"]),
            _scored(s["drift"]["top1_agreement"]), _scored(t.get("gain_kept", missing)),
            _scored(t.get("gain_masked", missing))]) + " |")
    return "\n".join(lines) + "\n"


def plot_drift_vs_gain(summaries: dict[str, dict], path: str | Path, gain: str = "gain_kept") -> Path:
    """Scatter of drift (mean KL(base‖tuned)) against target gain per method, with 95% bars.

    The x axis is the gain on the report's target task when there is one (``gain_target``,
    signed so that higher is better), else ``gain`` of the held-out NLL kinds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, s in summaries.items():
        g = s["target"].get("gain_target") or s["target"].get(gain)
        d = s["drift"]["kl_base_tuned"]
        if g is None or math.isnan(d["score"]):
            continue
        ax.errorbar(g["score"], d["score"], xerr=[[g["score"] - g["ci95"][0]], [g["ci95"][1] - g["score"]]],
                    yerr=[[d["score"] - d["ci95"][0]], [d["ci95"][1] - d["score"]]], fmt="o", capsize=3)
        ax.annotate(name, (g["score"], d["score"]), textcoords="offset points", xytext=(5, 5))
    target = next((s["target"]["gain_target"]["task"] for s in summaries.values() if "gain_target" in s["target"]),
                  None)
    ax.set_xlabel(f"target gain (paired change of {target})" if target else f"target gain ({gain}: −Δ held-out NLL)")
    ax.set_ylabel("drift: mean KL(base‖tuned), non-target")
    ax.grid(alpha=0.3)
    from forgetless.report.plots import save_figure

    return save_figure(fig, Path(path))

