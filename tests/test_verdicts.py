"""Verdicts on synthetic records whose answer is known: identical recipes never win, a clear dominance wins, a
one-sided measure never headlines, noise-only gains give no matched-gain verdict."""

import random

import pytest

from forgetless.core.matched import matched_gain
from forgetless.core.sentences import verdict_sentence
from forgetless.core.verdicts import Measure, VerdictConfig, records_from_rows, same_dose

MEASURES = [Measure("target", "MBPP pass@1", role="target"), Measure("ret", "GSM8K did what was asked"),
            Measure("length", "GSM8K working kept", one_sided="a length measure: longer answers keep more")]
CFG = VerdictConfig(n_boot=500, seed=0, matched_gain=0.1)


def rows_of(model, recipe, dose, alpha, draw, p, rng, n=120, base=False):
    """Bernoulli scores with success chance p[measure] per item."""
    return [{"model": model, "recipe": recipe, "dose": None if base else dose, "alpha": alpha,
             "draw": draw, "measure": m, "item": f"{m}{i}", "score": float(rng.random() < p[m])}
            for m in p for i in range(n)]


def records(spec, draws=2, seed=0, n=120):
    """spec: recipe -> {measure: chance}; each recipe trained at dose 'lr1' on every draw, plus the base."""
    rng = random.Random(seed)
    rows = rows_of("base", "base", None, 1.0, 0, {"target": 0.2, "ret": 0.9, "length": 0.9}, rng, n, base=True)
    for recipe, p in spec.items():
        for d in range(draws):
            rows += rows_of(f"{recipe}@lr1", recipe, "lr1", 1.0, d, p, rng, n)
    return records_from_rows(rows, MEASURES)


def headline(rows):
    return {(r["rival"], r["measure"]): r for r in rows if r["headline"]}


def test_two_identical_recipes_never_win():
    recs = records({"stm": {"target": 0.4, "ret": 0.7, "length": 0.7}})
    rows = [dict(r, model=r["model"].replace("stm", "twin"), recipe="twin") for r in _rows(recs)
            if r["recipe"] == "stm"]
    twin = records_from_rows(_rows(recs) + rows, MEASURES)
    row = headline(same_dose(twin, CFG))[("twin@lr1", "ret")]
    assert row["diff"] == 0 and row["verdict"] == "equivalent"   # every replicate is 0: TOST passes
    for seed in range(3):  # same chances, independent noise: never a win or a loss
        noisy = records({"stm": {"target": 0.4, "ret": 0.7, "length": 0.7},
                         "sft": {"target": 0.4, "ret": 0.7, "length": 0.7}}, seed=seed)
        assert headline(same_dose(noisy, CFG))[("sft@lr1", "ret")]["verdict"] in ("not resolved", "equivalent")


def _rows(recs):
    out = []
    for model, per in recs.scores.items():
        m = recs.models[model]
        for measure, by_draw in per.items():
            for draw, items in by_draw.items():
                out += [{"model": model, "recipe": m.recipe, "dose": m.dose, "alpha": m.alpha, "draw": draw,
                         "measure": measure, "item": i, "score": s} for i, s in items.items()]
    return out


def test_clear_dominance_on_both_axes_wins_and_the_mirror_loses():
    recs = records({"stm": {"target": 0.7, "ret": 0.9, "length": 0.5},
                    "sft": {"target": 0.4, "ret": 0.3, "length": 0.9},
                    "replay": {"target": 0.95, "ret": 1.0, "length": 0.5}})
    rows = same_dose(recs, CFG)
    sft = headline(rows)[("sft@lr1", "ret")]
    assert sft["verdict"] == "wins" and sft["ci95"][0] > 0 and sft["p_holm"] < 0.05
    assert headline(rows)[("replay@lr1", "ret")]["verdict"] == "loses"
    sentence = verdict_sentence(sft, "GSM8K did what was asked", 2)
    assert (sentence.startswith("stm@lr1 wins against sft@lr1 on GSM8K did what was asked")
            and "n = 120 items × 2 draws" in sentence)


def test_better_retention_with_a_worse_target_is_not_a_win():
    recs = records({"stm": {"target": 0.2, "ret": 0.9, "length": 0.9},
                    "sft": {"target": 0.7, "ret": 0.3, "length": 0.9}})
    row = headline(same_dose(recs, CFG))[("sft@lr1", "ret")]
    assert row["p_holm"] < 0.05 and row["verdict"] == "not resolved" and "non-inferior" in row["reason"]


def test_a_tie_on_retention_at_less_learning_says_the_reference_learned_less():
    recs = records({"stm": {"target": 0.2, "ret": 0.7, "length": 0.9},
                    "sft": {"target": 0.7, "ret": 0.7, "length": 0.9},
                    "dft": {"target": 0.2, "ret": 0.7, "length": 0.9}}, n=300)
    rows = headline(same_dose(recs, CFG))
    sft, dft = rows[("sft@lr1", "ret")], rows[("dft@lr1", "ret")]
    assert sft["verdict"] in ("not resolved", "equivalent") and sft["p_holm"] >= 0.05
    assert "and the reference learned less on the target (reference − rival in [-0." in sft["reason"]
    assert "learned less" not in dft["reason"] and "learn as much" not in dft["reason"]  # same target: no clause


def test_a_one_sided_measure_never_headlines():
    recs = records({"stm": {"target": 0.6, "ret": 0.7, "length": 1.0},
                    "sft": {"target": 0.6, "ret": 0.7, "length": 0.0}})
    rows = same_dose(recs, CFG)
    length = next(r for r in rows if r["measure"] == "length")
    assert length["diff"] == pytest.approx(1.0) and not length["headline"] and "verdict" not in length
    assert [r["measure"] for r in rows if r["headline"]] == ["ret"]


def test_holm_family_spans_every_rival():
    recs = records({"stm": {"target": 0.5, "ret": 0.8, "length": 0.5}, "a": {"target": 0.5, "ret": 0.7, "length": 0.5},
                    "b": {"target": 0.5, "ret": 0.7, "length": 0.5}})
    fam = [r for r in same_dose(recs, CFG) if r["headline"]]
    assert len(fam) == 2 and all(r["p_holm"] >= r["p"] for r in fam)
    assert sorted(r["holm_level"] for r in fam) == pytest.approx([0.95, 0.975])


def matched_records(gains, seed=0, n=150):
    """Each recipe: models at alpha 0.5 and 1 whose target chance is base + gain*alpha."""
    rng = random.Random(seed)
    rows = rows_of("base", "base", None, 1.0, 0, {"target": 0.3, "ret": 0.9}, rng, n, base=True)
    for recipe, (gain, ret) in gains.items():
        for alpha in (0.5, 1.0):
            p = {"target": 0.3 + gain * alpha, "ret": 0.9 - (0.9 - ret) * alpha}
            rows += rows_of(f"{recipe}@a{alpha}", recipe, "lr1", alpha, 0, p, rng, n)
    return records_from_rows(rows, MEASURES[:2])


def test_noise_only_gains_give_no_matched_gain_verdict():
    for seed in range(3):
        recs = matched_records({"stm": (0.0, 0.8), "sft": (0.0, 0.4)}, seed=seed)
        (row,) = matched_gain(recs, CFG)
        assert row["verdict"] == "not resolved", row
        assert row["reached_both"] < 0.9


def test_real_gains_and_a_dominating_curve_win_at_matched_gain():
    recs = matched_records({"stm": (0.4, 0.85), "sft": (0.4, 0.3)})
    (row,) = matched_gain(recs, CFG)
    assert row["verdict"] == "wins" and row["reached_both"] > 0.99 and row["ci95"][0] > 0
    assert matched_gain(recs, VerdictConfig(n_boot=500, matched_gain=None)) == []


def test_a_row_without_an_estimate_reads_without_numbers():
    row = {"reference": "stm", "rival": "sft", "verdict": "not resolved", "gain": 0.05, "diff": float("nan"),
           "ci95": [float("-inf"), float("inf")], "n_items": 150, "n_draws": 1,
           "reason": "a curve does not reach gain 0.05 on the measured models"}
    assert verdict_sentence(row, "IFEval", 2) == (
        "stm is not resolved against sft on IFEval at gain 0.05: no difference to estimate, n = 150 items; a curve "
        "does not reach gain 0.05 on the measured models.")
