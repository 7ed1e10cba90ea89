"""Verdicts a reviewer would sign: every recipe against the reference (STM), from per-item records.

Input (:class:`Records`): per model, per measure, per training draw, per item, a score. A model is a
recipe at a *dose* (learning rate, steps, adapter and training data: one string, the same for
recipes trained alike) scaled by WiSE-FT's ``alpha`` (1: the trained model); the base has dose None
and is the same model for every draw.

1. **Same dose** (:func:`same_dose`): for each dose the reference was trained at and each rival
   trained at it (alpha 1), the paired difference reference - rival on every measure, from one
   joint bootstrap (:mod:`forgetless.core.bootstrap`: draws and items resampled, the same indices
   for every model). The family of the headline tests (every rival x dose x headline retention
   measure) is Holm-corrected.
2. **Verdict** of a headline test (:func:`classify`): *wins* when the Holm-adjusted p < alpha with
   the reference better *and* the reference's target is non-inferior (the lower bound of
   reference - rival on the target, 95%, above -target_margin); *loses* the mirror image;
   *equivalent within ±m* when TOST at the equivalence margin passes after Holm over the same
   family; otherwise *not resolved*. A measure flagged one-sided (it favours a kind of recipe by
   construction, e.g. a length measure) is reported but never headlines.
3. **Matched gain** (:func:`matched_gain`, secondary): each recipe's curve is the upper concave
   hull (:mod:`forgetless.core.hull`) of its models' (gain, retention), base at (0, base
   retention), rebuilt in every replicate from that replicate's gains; read at one gain g* fixed in
   the config. A replicate where a curve does not reach g* counts against every claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from forgetless.core.bootstrap import (Resample, draw_resample, holm, holm_levels, p_tost, p_two_sided,
                                       percentile_interval, replicate_means)

BASE = "base"


@dataclass(frozen=True)
class VerdictConfig:
    """How the verdicts are read off the bootstrap; fixed before the run."""

    reference: str | None = field(default=None, metadata={"help": "the recipe every other is compared with "
                                                                   "(default: the first recipe of the records)"})
    target_margin: float = field(default=0.05, metadata={"help": "non-inferiority margin on the target: a win needs "
                                                                 "the target difference's lower bound above -margin"})
    equivalence_margin: float = field(default=0.05, metadata={"help": "±m of 'equivalent within ±m' (TOST) on a "
                                                                      "retention measure"})
    matched_gain: float | None = field(default=0.05, metadata={"help": "g*: the one target gain the curves are "
                                                                       "compared at (None: no "
                                                                       "matched-gain comparison)"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap replicates"})
    alpha: float = field(default=0.05, metadata={"help": "family-wise error rate (Holm) of each family of tests"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})

    def __post_init__(self):
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha {self.alpha} must be in (0, 0.5)")
        if self.target_margin < 0 or self.equivalence_margin <= 0:
            raise ValueError("target_margin must be >= 0 and equivalence_margin > 0")
        if self.n_boot < 100:
            raise ValueError(f"n_boot {self.n_boot}: at least 100 replicates")


@dataclass(frozen=True)
class Measure:
    """One axis of items."""

    name: str
    plain: str
    role: str = "retention"  # "target" or "retention"
    higher_is_better: bool = True
    one_sided: str | None = None  # why it favours a kind of recipe; such a measure never headlines

    @property
    def headline(self) -> bool:
        return self.role == "retention" and self.one_sided is None


@dataclass(frozen=True)
class Model:
    label: str
    recipe: str
    dose: str | None
    alpha: float = 1.0


@dataclass(frozen=True)
class Records:
    """``scores[model][measure][draw][item]``; every model and measure named in ``models`` / ``measures``."""

    models: dict[str, Model]
    measures: dict[str, Measure]
    scores: dict[str, dict[str, dict[int, dict[str, float]]]]

    @property
    def target(self) -> Measure:
        return next(m for m in self.measures.values() if m.role == "target")

    def recipes(self) -> list[str]:
        return list(dict.fromkeys(m.recipe for m in self.models.values() if m.recipe != BASE))


def records_from_rows(rows, measures: list[Measure]) -> Records:
    """Records from flat rows ``{"model", "recipe", "dose", "alpha", "draw", "measure", "item", "score"}``
    (the layout of ``items.jsonl.gz``); rows of measures not in ``measures`` and NaN scores are left out."""
    named = {m.name: m for m in measures}
    models, scores = {}, {}
    for r in rows:
        models.setdefault(r["model"], Model(r["model"], r["recipe"], r.get("dose"), float(r.get("alpha", 1.0))))
        if r["measure"] in named and r["score"] is not None and not math.isnan(r["score"]):
            by_draw = scores.setdefault(r["model"], {}).setdefault(r["measure"], {})
            by_draw.setdefault(int(r.get("draw", 0)), {})[str(r["item"])] = float(r["score"])
    return Records(models, named, scores)


def arrays(records: Records) -> tuple[list[int], dict[str, list[str]], dict[str, dict[str, np.ndarray]]]:
    """(draws, items per measure, values[measure][model] (D, N)): the items every model scored on every draw it
    has, the draws of the trained models (the base's one draw repeated on each)."""
    draws = sorted({d for lab, per in records.scores.items() if records.models[lab].recipe != BASE
                    for by_draw in per.values() for d in by_draw}) or [0]
    items, values = {}, {}
    for name in records.measures:
        have = [(lab, per[name]) for lab, per in records.scores.items() if name in per]
        common = set.intersection(*(set(s) for _, by_draw in have for s in by_draw.values())) if have else set()
        items[name] = sorted(common)
        values[name] = {}
        for lab, by_draw in have:
            rows = [by_draw.get(d, by_draw.get(0) if records.models[lab].recipe == BASE else None) for d in draws]
            if any(r is None for r in rows):
                continue  # a trained model missing a draw cannot be paired on that draw
            values[name][lab] = np.array([[r[i] for i in items[name]] for r in rows], dtype=float).reshape(
                len(draws), len(items[name]))
    return draws, items, values


def summarize(reps: np.ndarray, estimate: float, n_items: int, n_draws: int, margin: float) -> dict:
    """One difference: estimate, 95% percentile interval, n, two-sided p, TOST p at ``margin``."""
    lo, hi = percentile_interval(reps, 0.95)
    return {"diff": estimate, "ci95": [lo, hi], "n_items": n_items, "n_draws": n_draws,
            "p": p_two_sided(reps), "p_tost": p_tost(reps, margin), "margin": margin}


def same_dose(records: Records, cfg: VerdictConfig, resample: Resample | None = None) -> list[dict]:
    """Every (rival, dose, measure): reference - rival, with the Holm-adjusted family of the headline tests and
    their verdicts (:func:`classify`)."""
    ref = cfg.reference or records.recipes()[0]
    draws, items, values = arrays(records)
    resample = resample or draw_resample(len(draws), {k: len(v) for k, v in items.items()}, cfg.n_boot, cfg.seed)
    rows = []
    for ref_model, rival_model in dose_pairs(records, ref):
        for name, measure in records.measures.items():
            a, b = values[name].get(ref_model.label), values[name].get(rival_model.label)
            if a is None or b is None or not items[name]:
                continue
            diff = a - b  # (D, N)
            reps = replicate_means(diff, resample.draws, resample.items[name])
            margin = cfg.target_margin if measure.role == "target" else cfg.equivalence_margin
            rows.append({"reference": ref_model.label, "rival": rival_model.label, "recipe": rival_model.recipe,
                         "dose": ref_model.dose, "measure": name, "headline": measure.headline,
                         **summarize(reps, float(diff.mean()), len(items[name]), len(draws), margin)})
    return adjust_and_classify(rows, records, cfg)


def dose_pairs(records: Records, ref: str) -> list[tuple[Model, Model]]:
    """(reference model, rival model) at each dose the reference was trained at (alpha 1), rivals in record order."""
    trained = [m for m in records.models.values() if m.recipe != BASE and m.alpha == 1.0]
    pairs = []
    for r in (m for m in trained if m.recipe == ref):
        pairs += [(r, m) for m in trained if m.recipe != ref and m.dose == r.dose]
    return pairs


def adjust_and_classify(rows: list[dict], records: Records, cfg: VerdictConfig) -> list[dict]:
    """Holm over the headline rows (differences and TOST, one family each), then each headline row's verdict."""
    family = [r for r in rows if r["headline"]]
    for key, out in (("p", "p_holm"), ("p_tost", "p_tost_holm")):
        for row, adjusted in zip(family, holm([r[key] for r in family])):
            row[out] = adjusted
    for row, level in zip(family, holm_levels([r["p"] for r in family], cfg.alpha)):
        row["holm_level"] = level
    target = {(r["reference"], r["rival"]): r for r in rows if r["measure"] == records.target.name}
    for row in family:
        higher = records.measures[row["measure"]].higher_is_better
        row["verdict"], row["reason"] = classify(row, target.get((row["reference"], row["rival"])), higher,
                                                 records.target.higher_is_better, cfg)
    return rows


def p_text(p: float, n_boot: int) -> str:
    """A bootstrap p: '< 1/B' when no replicate crossed (the bootstrap cannot tell smaller p apart)."""
    return f"< {1 / n_boot:.2g}" if p == 0 else f"{p:.3g}"


def classify(row: dict, target: dict | None, higher: bool, target_higher: bool,
             cfg: VerdictConfig) -> tuple[str, str]:
    """(verdict, reason) of one headline row: wins / loses / equivalent / not resolved (module docstring)."""
    resolved = row["p_holm"] < cfg.alpha
    ref_better = (row["diff"] > 0) == higher
    if resolved and target is None:
        return "not resolved", "the retention difference is resolved, but there is no target record to check the dose"
    lo, hi = (None, None) if target is None else (
        target["ci95"] if target_higher else [-target["ci95"][1], -target["ci95"][0]])
    if resolved:
        held = f"retention resolved (Holm p {p_text(row['p_holm'], cfg.n_boot)})"
        if ref_better and lo > -cfg.target_margin:
            return "wins", f"{held}; target non-inferior (lower bound {lo:+.3f} > -{cfg.target_margin:g})"
        if not ref_better and hi < cfg.target_margin:
            return "loses", f"{held}; the rival's target non-inferior (upper bound {hi:+.3f} < {cfg.target_margin:g})"
        side = "reference" if ref_better else "rival"
        why = f"the {side} keeps more, but its target is not shown non-inferior within {cfg.target_margin:g}"
    else:
        why = f"Holm p {p_text(row['p_holm'], cfg.n_boot)} ≥ {cfg.alpha:g}"
    tost = f"TOST within ±{row['margin']:g}"
    if row["p_tost_holm"] < cfg.alpha:
        verdict, why = "equivalent", f"{tost} passes (Holm p {p_text(row['p_tost_holm'], cfg.n_boot)})"
    else:
        verdict = "not resolved"
        why += f"; {tost} does not pass (Holm p {p_text(row['p_tost_holm'], cfg.n_boot)})"
    said = verdict == "not resolved" and resolved and ref_better  # the reason names the reference's target already
    if lo is not None and lo <= -cfg.target_margin and not said:
        # the same retention at less learning is not the same result: the sentence says so
        learned = "learned less" if hi < 0 else "is not shown to learn as much"
        why += (f"; and the reference {learned} on the target (reference − rival in [{lo:+.3f}, {hi:+.3f}], "
                f"non-inferiority margin {cfg.target_margin:g})")
    return verdict, why
