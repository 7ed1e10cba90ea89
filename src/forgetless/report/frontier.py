"""``<out>/report/frontier.{md,json,png}``: retention against target gain, one curve per method.

Points of a method's curve: the base (gain 0, nothing lost), one point per learning rate
(the final model's retention records, from ``summarize_run``) and, when training ran with
probes, one point per probe step. The table gives each method's retention at matched target
gains (interpolated along its learning-rate curve, never extrapolated) and the learning rate
that reaches it; the paired sentences compare methods item by item on the same items.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from forgetless.core.verdicts import VerdictConfig
from forgetless.core.frontier import common_gains, items_at_gain, matched_gain_table, resolved, verdict
from forgetless.core.intervals import paired_difference
from forgetless.lm import artifacts
from forgetless.report.cells import MISSING, cell, number
from forgetless.report.frontier_points import (NAN, base_point, final_point, item_scores, probe_points,
                                              retention_items, seed_scores)
from forgetless.report.plots import can_plot
from forgetless.retention.records import list_tasks
from forgetless.retention.summary import accuracy_tasks

logger = logging.getLogger(__name__)

_signed = functools.partial(cell, signed=True)  # the frontier's differences and scores: signed, 3 digits
GAIN_LEANS = {"gain_target": "paired change of the target task's graded success: favours no method",
              "gain_all": "held-out NLL decrease on all gold tokens: favours ground truth by construction",
              "gain_kept": "held-out NLL decrease on the kept kind: favours STM by construction",
              "gain_masked": "held-out NLL decrease on the masked kind: favours ground truth by construction"}


@dataclass(frozen=True)
class FrontierSettings:
    """A run's ``frontier`` section: what the frontier plots (:func:`build_frontier`) and how the verdicts are read
    (:func:`forgetless.report.verdicts.verdict_section`)."""

    gain: str = field(default="gain_all", metadata={"help": f"target gain: {', '.join(GAIN_LEANS)}"})
    retention: str = field(default="mc_retention", metadata={"help": "retention measure: mc_retention, "
                                                                     "did_what_asked, top1_agreement, ..."})
    n_gains: int = field(default=3, metadata={"help": "gains every curve reaches that the recipes are compared at"})
    verdicts: VerdictConfig = field(default_factory=VerdictConfig, metadata={"help": "how the verdicts are read"})



def paired_sentences(dirs: dict[str, Path], pairs: list[tuple[str, str]]) -> list[dict]:
    """Paired bootstrap of a − b on every shared MC accuracy, drift and held-out item measure."""
    out = []
    for a, b in pairs:
        shared = sorted(set(list_tasks(dirs[a])) & set(list_tasks(dirs[b])))
        measures = [(t, True) for t in accuracy_tasks(shared)]
        measures += [(t, t.endswith("top1_agreement")) for t in shared if t.startswith("drift:")
                     and (t.count(":") == 1 or t.endswith((":top1_agreement", ":kl_tuned_base")))]
        measures += [(t, False) for t in shared if t.startswith("heldout:")]
        measures += [(t, not t.endswith((":skips_working", ":surprise"))) for t in shared if t.startswith("gen:")]
        for task, higher in measures:
            r = paired_difference(item_scores(dirs[a], task), item_scores(dirs[b], task))
            name = f"{task}:kl_base_tuned" if task.startswith("drift:") and task.count(":") == 1 else task
            out.append({"a": a, "b": b, "measure": name, **r, "sentence": verdict(a, b, name, r, higher)})
    return out


def _nearest_pairs(curves: dict[str, list[dict]], labels: dict[tuple[str, int], str]) -> list[tuple[str, str]]:
    """For each method against the first: the two lr points of closest target gain."""
    methods = list(curves)
    pairs = []
    for other in methods[1:]:
        best = None
        for i, p in enumerate(curves[methods[0]]):
            for j, q in enumerate(curves[other]):
                if (methods[0], i) in labels and (other, j) in labels:
                    d = abs(p["gain"] - q["gain"])
                    if best is None or d < best[0]:
                        best = (d, labels[(other, j)], labels[(methods[0], i)])
        if best:
            pairs.append((best[1], best[2]))
    return pairs


def matched_vs_reference(curves: dict[str, list[dict]], reference: str, retention: str,
                         gains: Sequence[float] = ()) -> list[dict]:
    """At the target gain of each of ``reference``'s points, and at each of ``gains`` (the gains every curve reaches,
    the reference's items interpolated there too): every other curve's retention interpolated item by item
    (:func:`items_at_gain`), and the paired difference other − reference over the same items."""
    if reference not in curves:
        return []
    ordered = {m: sorted((p for p in pts if p.get("items")), key=lambda p: p["gain"]) for m, pts in curves.items()}
    at = [(ref["label"], ref["gain"], ref.get("gain_ci95"), ref["items"])
          for ref in ordered[reference][1:] if not math.isnan(ref["gain"])]
    for g in gains:
        items = items_at_gain(ordered[reference], g)
        if items:
            at.append((f"{reference} curve at gain {g:.3f}", g, None, items))
    rows = []
    for label, gain, gain_ci, ref_items in sorted(at, key=lambda r: r[1]):
        row = {"reference": label, "gain": gain, "gain_ci95": gain_ci,
               "reference_retention": sum(ref_items.values()) / len(ref_items), "others": {}}
        for method, pts in ordered.items():
            if method == reference:
                continue
            items = items_at_gain(pts, gain)
            if items is None:
                row["others"][method] = None
                continue
            diff = paired_difference(items, ref_items)
            row["others"][method] = {"retention": sum(items.values()) / len(items) if items else NAN, **diff,
                                     "resolved": resolved(diff)}
        rows.append(row)
    return rows


def build_frontier(grid: list[dict], base_dir: Path, gain: str = FrontierSettings.gain,
                   retention: str = FrontierSettings.retention, n_gains: int = FrontierSettings.n_gains,
                   target: str | None = None) -> dict:
    """``grid``: [{"label", "method", "lr", "retention_dir", "train_dir"}] -> the frontier's data."""
    curves: dict[str, list[dict]] = {}
    probes: dict[str, list[dict]] = {}
    labels: dict[tuple[str, int], str] = {}
    dirs = {"base": base_dir}
    for g in grid:
        pts = curves.setdefault(g["method"], [{**base_point(base_dir, target),
                                               "items": retention_items(base_dir, retention, target)}])
        if g.get("retention_dir") and Path(g["retention_dir"]).is_dir():
            p = {"label": g["label"], "lr": g["lr"], "alpha": g.get("alpha"),
                 **final_point(base_dir, Path(g["retention_dir"]), gain, g.get("train_dir"), target),
                 "items": retention_items(Path(g["retention_dir"]), retention, target),
                 "seeds": seed_scores(Path(g["retention_dir"]), retention, target)}
            labels[(g["method"], len(pts))] = g["label"]
            pts.append(p)
            dirs[g["label"]] = Path(g["retention_dir"])
        if g.get("train_dir"):
            probes[g["label"]] = probe_points(Path(g["train_dir"]), gain)
    for m in curves:
        curves[m] = [p for p in curves[m] if not math.isnan(p["gain"])]
    ret_curves = {m: [{"gain": p["gain"], "retention": p[retention], "ci95": p.get(f"{retention}_ci95"),
                       "lr": p.get("lr")}
                      for p in pts if not math.isnan(p[retention])] for m, pts in curves.items()}
    gains = [x for x in common_gains({m: c for m, c in ret_curves.items() if len(c) > 1}, n_gains) if x > 0]
    table = matched_gain_table(ret_curves, gains)
    same_lr = sorted({(g["label"], h["label"]) for g in grid for h in grid if g["lr"] == h["lr"]
                      and g["method"] != h["method"] and g["method"] == grid[0]["method"]
                      and g["label"] in dirs and h["label"] in dirs}, key=lambda x: x[::-1])
    pairs = [(b, a) for a, b in same_lr] + _nearest_pairs(curves, labels)
    vs_reference = matched_vs_reference(curves, grid[0]["method"], retention, gains) if grid else []
    for pts in curves.values():
        for p in pts:
            p.pop("items", None)
    return {"gain": gain, "retention": retention, "curves": curves, "probes": probes, "gains": gains,
            "reference": grid[0]["method"] if grid else None, "vs_reference": vs_reference,
            "matched": {m: {str(k): v for k, v in row.items()} for m, row in table.items()},
            "paired": paired_sentences(dirs, list(dict.fromkeys(pairs)))}


def matched_sentences(data: dict) -> list[str]:
    """At each matched gain: the method of highest retention, and whether the intervals separate it."""
    out = []
    for g in data["gains"]:
        cells = {m: row.get(str(g)) for m, row in data["matched"].items() if row.get(str(g))}
        if len(cells) < 2:
            continue
        best = max(cells, key=lambda m: cells[m]["retention"])
        rest = [m for m in cells if m != best]
        lo = (cells[best]["ci95"] or [None])[0]
        apart = lo is not None and all(cells[m]["ci95"] and cells[m]["ci95"][1] < lo for m in rest)
        out.append(f"At target gain {g:.3f}, {best} keeps the most ({cells[best]['retention']:.3f} vs "
                   + ", ".join(f"{m} {cells[m]['retention']:.3f}" for m in rest) + "); "
                   + ("its interval is clear of the others'." if apart else
                      "the intervals overlap, so this does not rank the methods."))
    return out


def mechanism_sentences(data: dict) -> list[str]:
    by_lr: dict[float, list[str]] = {}
    for method, pts in data["curves"].items():
        for p in pts:
            if p.get("lr") and not math.isnan(p.get("dw_frobenius", NAN)):
                by_lr.setdefault(p["lr"], []).append(f"{method} {p['dw_frobenius']:.3f} (gain {p['gain']:+.3f})")
    return [f"lr {lr:g}: " + "; ".join(v) for lr, v in sorted(by_lr.items())] or ["no weight diagnostics found."]


def reference_section(data: dict) -> list[str]:
    """The headline: every recipe's retention at the target gain of each point of the reference (the first method),
    interpolated item by item along its curve, with the paired difference recipe − reference."""
    rows, ref = data.get("vs_reference") or [], data.get("reference")
    if not rows:
        return []
    methods = list(rows[0]["others"])
    lines = [f"## {data['retention']} of every recipe at {ref}'s target gains (paired against {ref})", "",
             f"Each column is a recipe's {data['retention']} (the mean over items) interpolated item by item along its "
             f"curve (base, then its points by gain) at the gain of one {ref} point, or at a gain every curve reaches "
             f"({ref}'s own curve interpolated there too), then recipe − {ref} over the same items, paired bootstrap "
             "95%. — : the recipe's curve does not reach that gain (never extrapolated). The gain itself carries its "
             "own interval: where it is wide, the match is loose.", "",
             f"| {ref} point | target gain | {ref} | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    verdicts = []
    for row in rows:
        cells = []
        for m in methods:
            c = row["others"][m]
            if c is None:
                cells.append(MISSING)
                continue
            ci = c.get("ci95") or [NAN, NAN]
            cells.append(f"{number(c['retention'])} (Δ {_signed(c['mean'], ci)})")
            tag = {True: "resolved", False: "not resolved", None: "too few items"}[c.get("resolved")]
            verdicts.append(f"At {row['reference']}'s gain {row['gain']:+.3f}: {m} − {ref} = {_signed(c['mean'], ci)} "
                            f"over {c.get('n', 0)} items ({tag}).")
        lines.append(f"| {row['reference']} | {_signed(row['gain'], row.get('gain_ci95'))} "
                     f"| {row['reference_retention']:.3f} | " + " | ".join(cells) + " |")
    return lines + [""] + [f"- {v}" for v in verdicts] + [""]


def render_markdown(data: dict) -> str:
    gain, ret = data["gain"], data["retention"]
    lines = ["# Learning–forgetting frontier", "",
             f"Target gain: `{gain}` ({GAIN_LEANS.get(gain, gain)}; higher = learned more). Retention: `{ret}` "
             "(1 = nothing lost: the base's above-chance MC skill, or the base's working on non-target prompts). "
             "Intervals are 95%.", "",
             "Descriptive only: the verdicts are in `verdicts.md` (the opening of report.md: same-dose comparisons, "
             "Holm-corrected, and matched gain on each recipe's hull of real models). The matched-gain rows below "
             "interpolate outcomes between a model and the base (a random mixture of the two, not a model trained to "
             "that gain), are not corrected for multiplicity, and rank nothing.", ""]
    lines += reference_section(data)
    lines += [
             "## Points (one per method × learning rate or WiSE-FT α; the base is gain 0)", "",
             "| run | lr / α | gain | gain kept (favours STM) | gain masked (favours GT) | MC retention "
             "| did what was asked | working kept | top-1 agree | KL(base‖tuned) | KL(tuned‖base) | Δ entropy "
             "| ‖ΔW‖_F |", "|" + "---|" * 13]
    for pts in data["curves"].values():
        for p in pts[1:]:
            knob = f"α {p['alpha']:g}" if p.get("alpha") is not None else (p.get("lr") or MISSING)
            lines.append(f"| {p['label']} | {knob} | {_signed(p['gain'], p.get('gain_ci95'))} "
                         f"| {_signed(p.get('gain_kept'))} | {_signed(p.get('gain_masked'))} "
                         f"| {_signed(p['mc_retention'], p.get('mc_retention_ci95'))} "
                         f"| {_signed(p.get('did_what_asked', NAN), p.get('did_what_asked_ci95'))} "
                         f"| {_signed(p['working_kept'], p.get('working_kept_ci95'))} "
                         f"| {_signed(p['top1_agreement'], p.get('top1_agreement_ci95'))} "
                         f"| {_signed(p['kl_base_tuned'], p.get('kl_base_tuned_ci95'))} "
                         f"| {_signed(p['kl_tuned_base'])} "
                         f"| {_signed(p.get('entropy_change'))} | {_signed(p.get('dw_frobenius'), digits=2)} |")
    lines += ["", f"## {ret} at matched target gain (interpolated along each method's curve; — : not reached)", ""]
    if not data["gains"]:
        lines.append("The methods' curves share no range of target gain above 0: no matched comparison is possible.")
    else:
        lines += ["| method | " + " | ".join(f"gain {g:.3f}" for g in data["gains"]) + " |",
                  "|---|" + "---|" * len(data["gains"])]
        for method, row in data["matched"].items():
            cells = []
            for g in data["gains"]:
                c = row.get(str(g))
                cells.append(MISSING if c is None else f"{_signed(c['retention'], c['ci95'])}" +
                             (f" @ lr {c['lr']:.2g}" if c.get("lr") else ""))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Interpolated intervals are approximate (the neighbouring points' bounds); where two "
                  "methods' intervals overlap at a matched gain, this table does not rank them.", ""]
        lines += [f"- {s}" for s in matched_sentences(data)]
    lines += ["", "## Mechanism: ‖ΔW‖_F of the adapter at each learning rate", ""]
    lines += [f"- {s}" for s in mechanism_sentences(data)]
    if any(data["probes"].values()):
        lines += ["", "## Probe points along each run", "",
                  "| run | step | gain | MC retention | top-1 agree | KL(base‖tuned) | ‖ΔW‖_F |", "|" + "---|" * 7]
        for label, pts in data["probes"].items():
            for p in pts:
                lines.append(f"| {label} | {p['step']} | {_signed(p['gain'])} | {_signed(p['mc_retention'])} | "
                             f"{_signed(p['top1_agreement'])} | {_signed(p['kl_base_tuned'])} | "
                             f"{_signed(p['dw_frobenius'], digits=2)} |")
    lines += ["", "## Paired differences (same items, paired bootstrap 95%)", ""]
    resolved_n = sum(1 for r in data["paired"] if resolved(r))
    lines.append(f"{resolved_n} of {len(data['paired'])} paired differences are resolved by the item count "
                 "(interval excludes 0); every other difference below is inside its interval and ranks nothing.")
    lines += [""] + [f"- {r['sentence']}" for r in data["paired"]]
    return "\n".join(lines) + "\n"


def plot_frontier(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ret = data["retention"]
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for k, (method, pts) in enumerate(data["curves"].items()):
        pts = sorted((p for p in pts if not math.isnan(p[ret])), key=lambda p: p["gain"])
        color = f"C{k % 10}"
        xs, ys = [p["gain"] for p in pts], [p[ret] for p in pts]
        lo = [p[ret] - (p.get(f"{ret}_ci95") or [p[ret]] * 2)[0] for p in pts]
        hi = [(p.get(f"{ret}_ci95") or [p[ret]] * 2)[1] - p[ret] for p in pts]
        xlo = [p["gain"] - (p.get("gain_ci95") or [p["gain"]] * 2)[0] for p in pts]
        xhi = [(p.get("gain_ci95") or [p["gain"]] * 2)[1] - p["gain"] for p in pts]
        style = "--s" if method.startswith("WiSE-FT") else "-o"
        ax.errorbar(xs, ys, xerr=[xlo, xhi], yerr=[lo, hi], fmt=style, capsize=3, color=f"C{k % 10}", label=method,
                    alpha=0.85, lw=1.2, ms=4)
        for p in pts:
            text = f"α{p['alpha']:g}" if p.get("alpha") is not None else (f"{p['lr']:g}" if p.get("lr") else None)
            if text:
                ax.annotate(text, (p["gain"], p[ret]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for label, probe in data["probes"].items():
            if label.split("@")[0] == method and probe:
                ax.plot([0.0] + [p["gain"] for p in probe], [1.0 if ret in ("mc_retention", "top1_agreement") else 0.0]
                        + [p[ret] for p in probe], ":", color=color, alpha=0.5, lw=1)
    ax.set_xlabel(f"target gain ({data['gain']}: {GAIN_LEANS.get(data['gain'], '')})".replace(": )", ")"), fontsize=8)
    ax.set_ylabel(f"retention ({ret})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("points: lr (or WiSE-FT α); bars: 95% intervals on both axes", fontsize=8)
    from forgetless.report.plots import save_figure

    return save_figure(fig, path)


def write_frontier(report_dir: str | Path, data: dict) -> Path:
    """frontier.json, frontier.md and frontier.png in ``report_dir`` (each written then renamed)."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("frontier.json", json.dumps(data, indent=2, default=str) + "\n"),
                       ("frontier.md", render_markdown(data))):
        artifacts.write_text(out / name, text)
    if can_plot():
        plot_frontier(data, out / "frontier.png")
    return out / "frontier.md"
