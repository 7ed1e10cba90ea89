"""The report's verdict block from a frontier grid's retention directories: plain names, WiSE-FT models on their
recipe's curve, seeds as draws, and the records written beside it re-derive."""

import random
import sys
from pathlib import Path

from forgetless.report.verdicts import (ITEMS_FILE, grid_rows, plain_name, read_items, verdict_section)
from forgetless.retention.records import make_record, write_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from rederive import rederive  # noqa: E402


def test_plain_names():
    assert plain_name("gen:mbpp-validation:defines") == "MBPP validation: defines the function"
    assert plain_name("heldout:mbpp-validation:kept") == "MBPP validation: held-out NLL, kept tokens"
    assert plain_name("gen:gsm8k", "working_kept") == "GSM8K: working kept"
    assert plain_name("ifeval") == "IFEval" and plain_name("piqa") == "piqa"
    # a source given as a path: its last two parts (the whole path is in the run's config)
    assert plain_name("heldout:runs/mine/holdout/target.jsonl:all") == "holdout/target.jsonl: held-out NLL, all tokens"


def write_dir(d, chances, rng, seeds=1, n=100):
    """Records of a model: task -> chance; with seeds > 1 each item carries per-seed scores (a pooled record)."""
    for task, (chance, metric) in chances.items():
        items = []
        for i in range(n):
            scores = [float(rng.random() < chance) for _ in range(seeds)]
            items.append({"id": f"{task}/{i}", "score": sum(scores) / seeds,
                          **({"seeds": scores} if seeds > 1 else {})})
        write_task(d, make_record(task, metric, [it["score"] for it in items], higher_is_better=True), items)
    return d


def test_verdict_section_from_a_grid(tmp_path):
    rng = random.Random(0)
    task = lambda t, r, w: {"gen:mbpp": (t, "pass@1"), "ifeval": (r, "acc"), "gen:gsm8k": (w, "working_kept")}  # noqa: E731
    base = write_dir(tmp_path / "base", task(0.2, 0.9, 1.0), rng)
    stm = write_dir(tmp_path / "stm@lr0.001", task(0.65, 0.85, 0.6), rng, seeds=2)
    sft = write_dir(tmp_path / "sft@lr0.001", task(0.45, 0.3, 0.9), rng, seeds=2)
    half = write_dir(tmp_path / "sft@lr0.001@a0.5", task(0.35, 0.6, 0.95), rng)
    grid = [{"label": "stm@lr0.001", "method": "stm", "lr": 0.001, "alpha": None, "retention_dir": stm},
            {"label": "sft@lr0.001", "method": "sft", "lr": 0.001, "alpha": None, "retention_dir": sft},
            {"label": "sft@lr0.001@a0.5", "method": "WiSE-FT sft@lr0.001", "lr": None, "alpha": 0.5,
             "retention_dir": half},
            {"label": "sft@lr0.001@a1", "method": "WiSE-FT sft@lr0.001", "lr": None, "alpha": 1.0,
             "retention_dir": sft}]
    rows = grid_rows(grid, base)
    models = {(r["model"], r["recipe"], r["dose"], r["alpha"]) for r in rows}
    assert models == {("base", "base", None, 1.0), ("stm@lr0.001", "stm", "lr0.001", 1.0),
                      ("sft@lr0.001", "sft", "lr0.001", 1.0), ("sft@lr0.001@a0.5", "sft", "lr0.001", 0.5)}
    assert {r["draw"] for r in rows if r["model"] == "stm@lr0.001"} == {0, 1}
    out = tmp_path / "report"
    text = verdict_section(out, grid, base, "gen:mbpp", {"n_boot": 300, "matched_gain": 0.1})
    assert text.startswith("# Verdicts")
    first = text.split("\n- ", 1)[1].splitlines()[0]
    assert first.startswith("stm@lr0.001 wins against sft@lr0.001 on IFEval at dose lr0.001")
    assert "GSM8K: working kept" in text and "does not headline: a length measure" in text
    assert "gen:gsm8k" not in text.split("## Same-dose")[0]   # no internal names in the verdict block
    assert "![frontier](frontier.png)" in text
    assert len(read_items(out / ITEMS_FILE)) == len(rows)
    assert rederive(out) == []


def test_lean_list_marks_length_and_format_measures_one_sided():
    from forgetless.report.behaviour import lean

    for task in ("gen:gsm8k:working_kept", "gen:gsm8k:skips_working", "gen:gsm8k:format"):
        assert lean(task).startswith("one-sided, never the headline"), task
    assert lean("gen:gsm8k").startswith("neutral")  # did what was asked
    assert lean("gen:gsm8k:surprise").startswith("leans toward")


def test_one_headline_per_prompt_source_and_none_where_the_base_sits_at_the_floor():
    from forgetless.report.verdicts import measure_of

    sources = {"gen:ifeval": "IFEval: prompt-level strict accuracy", "gen:gsm8k": "GSM8K: did what was asked"}
    target = "gen:mbpp-test"
    assert measure_of("gen:ifeval", {"score": 0.17}, target, sources, 0.05).headline
    other = measure_of("gen:ifeval:inst_level_strict_acc", {"score": 0.29}, target, sources, 0.05)
    assert not other.headline and other.one_sided == ("another reading of the prompts of IFEval, whose headline is "
                                                      "IFEval: prompt-level strict accuracy")
    # GSM8K accuracy is another reading of the GSM8K prompts; alone (no gen:gsm8k record) it would headline
    assert not measure_of("gen:gsm8k:accuracy", {"score": 0.3}, target, sources, 0.05).headline
    assert measure_of("gen:gsm8k:accuracy", {"score": 0.3}, target, {}, 0.05).headline
    # floor: a base score <= the equivalence margin cannot lose more than the margin
    for score, headline in ((0.04, False), (0.05, False), (0.06, True)):
        m = measure_of("gen:gsm8k", {"score": score}, target, sources, 0.05)
        assert m.headline is headline, score
    assert "within the equivalence margin (0.05) of 0" in measure_of("gen:gsm8k", {"score": 0.04}, target,
                                                                      sources, 0.05).one_sided
    lower = measure_of("gen:gsm8k", {"score": 0.01, "higher_is_better": False}, target, sources, 0.05)
    assert lower.headline  # lower is better: a low base score is no floor for a loss
    assert measure_of("gen:gsm8k", {"score": 0.04}, target, sources, None).headline  # no margin given: no floor rule


def test_a_target_measured_by_eval_is_read_from_each_models_eval_dir(tmp_path):
    """On the user's own data the target (the held-out share, `holdout`) is an eval task, not a retention record:
    the verdicts read it from each model's eval directory, the base's too, and put it first."""
    rng = random.Random(1)
    retention = lambda r: {"ifeval": (r, "acc")}  # noqa: E731
    target = lambda t: {"holdout": (t, "chrf")}  # noqa: E731
    base = write_dir(tmp_path / "retention" / "base", retention(0.9), rng)
    base_eval = write_dir(tmp_path / "eval" / "base", target(0.3), rng)
    grid = []
    for label, t, r in (("stm", 0.8, 0.85), ("sft", 0.6, 0.3)):
        write_dir(tmp_path / "eval" / label, target(t), rng)
        grid.append({"label": label, "method": label, "lr": 0.001, "alpha": None,
                     "retention_dir": write_dir(tmp_path / "retention" / label, retention(r), rng),
                     "eval_dir": tmp_path / "eval" / label})
    assert verdict_section(tmp_path / "without", grid, base, "holdout", {"n_boot": 200}) == ""  # no base target
    rows = grid_rows(grid, base, base_eval, "holdout")
    assert {(r["model"], r["measure"]) for r in rows} == {(m, t) for m in ("base", "stm", "sft")
                                                          for t in ("holdout", "ifeval")}
    assert len([r for r in rows if r["measure"] == "holdout"]) == 300  # 100 items for each of the three models
    text = verdict_section(tmp_path / "report", grid, base, "holdout", {"n_boot": 200}, base_eval)
    assert "| sft | lr0.001 | holdout (target) |" in text
    assert text.split("\n- ", 1)[1].startswith("stm wins against sft on IFEval at dose lr0.001")
