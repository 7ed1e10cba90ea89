"""Matched gain (secondary to the same-dose verdicts): each recipe's hull read at one gain g*.

In every bootstrap replicate (the same :class:`forgetless.core.bootstrap.Resample` as the
same-dose comparisons) each model's gain (its target mean minus the base's, on the replicate's
items and draws) and retention are re-estimated, each recipe's upper concave hull is rebuilt
from them with the base at (0, base retention), and read at g*. The difference reference - rival
is NaN in a replicate where either curve does not reach g*; such a replicate counts against every
claim (:mod:`forgetless.core.bootstrap`), and the share of replicates each curve reaches is
reported. There is one g* (a config field fixed before the run), so no comparison is reported
twice. For a lower-is-better measure the hull is the lower one (values negated, hulled, negated
back).
"""

from __future__ import annotations

import math

import numpy as np

from forgetless.core.bootstrap import Resample, draw_resample, holm, replicate_means
from forgetless.core.hull import retention_at_gain
from forgetless.core.verdicts import BASE, Records, VerdictConfig, arrays, p_text, summarize


def recipe_curves(records: Records, measure: str, gain: float, resample: Resample) -> dict[str, dict]:
    """recipe -> {"value": retention on its hull at ``gain`` (NaN: not reached), "reps": (B,), "reached": share,
    "points": [(gain, retention)] of its models on the full sample}; {} without the base's records."""
    draws, items, values = arrays(records)
    t = records.target.name
    sign = 1.0 if records.measures[measure].higher_is_better else -1.0
    base = next((lab for lab, m in records.models.items() if m.recipe == BASE), None)
    if base is None or base not in values[t] or base not in values[measure]:
        return {}  # no base point: no curve starts anywhere
    w_d, w_t, w_r = resample.draws, resample.items[t], resample.items[measure]
    base_t, base_r = replicate_means(values[t][base], w_d, w_t), replicate_means(values[measure][base], w_d, w_r)
    out = {}
    for recipe in records.recipes():
        labels = [lab for lab, m in records.models.items() if m.recipe == recipe
                  and lab in values[t] and lab in values[measure]]
        if not labels:
            continue
        gains = [replicate_means(values[t][lab], w_d, w_t) - base_t for lab in labels]
        rets = [replicate_means(values[measure][lab], w_d, w_r) for lab in labels]
        reps = np.array([sign * retention_at_gain([(0.0, sign * base_r[b])] + [(g[b], sign * r[b]) for g, r in
                                                                                zip(gains, rets)], gain)
                         for b in range(resample.n_boot)])
        points = [(float(values[t][lab].mean() - values[t][base].mean()), float(values[measure][lab].mean()))
                  for lab in labels]
        full = [(0.0, sign * float(values[measure][base].mean()))] + [(g, sign * r) for g, r in points]
        out[recipe] = {"value": sign * retention_at_gain(full, gain), "reps": reps,
                       "reached": float(np.mean(~np.isnan(reps))), "points": points}
    return out


def matched_gain(records: Records, cfg: VerdictConfig, resample: Resample | None = None) -> list[dict]:
    """Every (rival, headline retention measure) at g* = ``cfg.matched_gain``: reference - rival on the hulls,
    Holm over the family of these rows; verdicts as for the same dose, without the target condition (the gain is
    matched). [] when g* is None."""
    if cfg.matched_gain is None:
        return []
    ref = cfg.reference or records.recipes()[0]
    draws, items, _ = arrays(records)
    resample = resample or draw_resample(len(draws), {k: len(v) for k, v in items.items()}, cfg.n_boot, cfg.seed)
    rows = []
    for name, measure in records.measures.items():
        if not measure.headline:
            continue
        curves = recipe_curves(records, name, cfg.matched_gain, resample)
        if ref not in curves:
            continue
        for recipe, c in curves.items():
            if recipe == ref:
                continue
            reps = curves[ref]["reps"] - c["reps"]  # NaN where either does not reach
            estimate = curves[ref]["value"] - c["value"]
            rows.append({"reference": ref, "rival": recipe, "measure": name, "gain": cfg.matched_gain,
                         "reached_reference": curves[ref]["reached"], "reached_rival": c["reached"],
                         "reached_both": float(np.mean(~np.isnan(reps))),
                         **summarize(reps, estimate, len(items[name]), len(draws), cfg.equivalence_margin)})
    for key, out in (("p", "p_holm"), ("p_tost", "p_tost_holm")):
        for row, adjusted in zip(rows, holm([r[key] for r in rows])):
            row[out] = adjusted
    for row in rows:
        row["verdict"], row["reason"] = classify_matched(row, records.measures[row["measure"]].higher_is_better, cfg)
    return rows


def classify_matched(row: dict, higher: bool, cfg: VerdictConfig) -> tuple[str, str]:
    """wins / loses / equivalent / not resolved at g*; never a verdict where a curve misses g* on the full sample."""
    if math.isnan(row["diff"]):
        return "not resolved", f"a curve does not reach gain {row['gain']:g} on the measured models"
    reach = f"both curves reach g* in {100 * row['reached_both']:.1f}% of replicates"
    if row["p_holm"] < cfg.alpha:
        return (("wins" if (row["diff"] > 0) == higher else "loses"),
                f"Holm p {p_text(row['p_holm'], cfg.n_boot)}; {reach}")
    if row["p_tost_holm"] < cfg.alpha:
        return "equivalent", (f"TOST within ±{row['margin']:g} passes "
                              f"(Holm p {p_text(row['p_tost_holm'], cfg.n_boot)}); {reach}")
    return "not resolved", (f"Holm p {p_text(row['p_holm'], cfg.n_boot)}, "
                            f"TOST Holm p {p_text(row['p_tost_holm'], cfg.n_boot)}; {reach}")
