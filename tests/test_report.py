"""TI/BWT arithmetic by hand, undefined relative changes, and the report files from fake runs."""

from __future__ import annotations

import json
import math

import pytest

from forgetless.report.sections import train_extras
from forgetless.report.stage import ReportConfig, forgetting_metrics, relative_change, run_report
from forgetless.core.intervals import (average_of_differences, bootstrap_interval, mean_difference, mean_interval,
                                       paired_difference, score_interval, wilson_interval)


def test_relative_change():
    assert relative_change(0.6, 0.4) == pytest.approx(0.5)
    assert relative_change(0.2, 0.4) == pytest.approx(-0.5)
    assert relative_change(0.3, 0.0) is None  # never divide by zero


def test_ti_bwt_hand_computed():
    base = {"mbpp": 0.40, "gsm8k": 0.50, "math": 0.20, "arc": 0.80}
    tuned = {"mbpp": 0.50, "gsm8k": 0.45, "math": 0.20, "arc": 0.60}
    m = forgetting_metrics(base, tuned, "mbpp")
    assert m["TI"] == pytest.approx(0.25)  # (0.5 - 0.4) / 0.4
    assert m["TI_abs"] == pytest.approx(0.10)
    # gsm8k -0.1, math 0.0, arc -0.25 -> mean -0.11667
    assert m["BWT"] == pytest.approx((-0.1 + 0.0 - 0.25) / 3)
    assert m["BWT_abs"] == pytest.approx((-0.05 + 0.0 - 0.20) / 3)
    assert m["notes"] == [] and m["bwt_tasks"] == ["gsm8k", "math", "arc"]


def test_zero_base_is_undefined_not_infinite():
    base = {"mbpp": 0.0, "gsm8k": 0.0, "arc": 0.5, "kl": 0.0}
    tuned = {"mbpp": 0.1, "gsm8k": 0.1, "arc": 0.25, "kl": 0.3}
    m = forgetting_metrics(base, tuned, "mbpp", lower_is_better=frozenset({"kl"}))
    assert m["TI"] is None and m["TI_abs"] == pytest.approx(0.1)
    assert m["BWT"] == pytest.approx(-0.5)  # arc only; gsm8k undefined; kl not a retention score
    assert m["BWT_abs"] == pytest.approx((0.1 - 0.25) / 2)
    assert m["bwt_undefined"] == ["gsm8k"]
    assert any("base score on mbpp is 0" in n for n in m["notes"])
    assert forgetting_metrics({"arc": 0.5}, {"arc": 0.5}, "mbpp")["TI"] is None


def test_intervals_hand_computed():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 4)[0] == 0.0 and all(math.isnan(x) for x in wilson_interval(0, 0))
    assert score_interval([1.0, 0.0, 1.0, 1.0]) == wilson_interval(3, 4)
    lo, hi = bootstrap_interval([0.5, 0.5, 0.5])
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_paired_difference_mean_interval_and_average_by_hand():
    z = 1.959963984540054
    # One order everywhere: first − second, over the ids both have.
    d = paired_difference({"x": 1.0, "y": 1.0}, {"x": 0.0, "y": 1.0, "z": 0.0})
    assert d["n"] == 2 and d["mean"] == 0.5
    # Resamples of the differences (1, 0) have means 0, 1/2, 1 with chances 1/4, 1/2, 1/4: the
    # 2.5% and 97.5% points of 2000 of them are 0 and 1.
    assert d["ci95"] == [0.0, 1.0]
    assert mean_difference([0.25] * 5)["ci95"] == pytest.approx([0.25, 0.25])
    assert paired_difference({"x": 1.0}, {"y": 1.0}) == {"n": 0, "mean": None, "ci95": None}
    # Normal interval of 1, 2, 3: sd 1, half-width z / sqrt(3).
    assert mean_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, 2.0 - z / math.sqrt(3), 2.0 + z / math.sqrt(3)))
    # Standard errors read back from the intervals (0.03, 0.04): se of the average sqrt(.03² + .04²) / 2 = 0.025.
    mean, lo, hi = average_of_differences([(0.1, 0.1 - z * 0.03, 0.1 + z * 0.03),
                                           (-0.2, -0.2 - z * 0.04, -0.2 + z * 0.04), (math.nan, math.nan, math.nan)])
    assert (mean, lo, hi) == pytest.approx((-0.05, -0.05 - z * 0.025, -0.05 + z * 0.025))


def _fake_train(root, name, masked_fraction, tau, delta_w=None):
    """A train run dir as `forgetless train` leaves it, trained on a mask stage whose manifest holds τ."""
    train, masks = root / "train" / name, root / "masks" / name
    train.mkdir(parents=True)
    masks.mkdir(parents=True)
    (train / "config.json").write_text(json.dumps({"data": str(masks / "data.parquet")}))
    (train / "train_summary.json").write_text(json.dumps({"table": {"masked_fraction": masked_fraction}}))
    if delta_w is not None:
        (train / "diagnostics.json").write_text(json.dumps({"total_frobenius": delta_w}))
    (masks / "manifest.json").write_text(json.dumps({"key": {}, "config": {"tau": 99.0}, "tau": tau,
                                                     "masked_fraction": masked_fraction}))
    return train


def _fake_run(path, scores: dict[str, float], n: int = 10, items: dict[str, list[float]] | None = None):
    path.mkdir(parents=True)
    records = {}
    for task, score in scores.items():
        records[task] = {"task": task, "metric": "accuracy", "score": score, "n": n,
                         "ci95": list(wilson_interval(score * n, n)),
                         "higher_is_better": True, "chance": None, "settings": {}}
        if items and task in items:
            (path / f"{task}.items.jsonl").write_text("".join(json.dumps({"id": f"{task}-{i}", "score": s}) + "\n"
                                                              for i, s in enumerate(items[task])))
    (path / "scores.json").write_text(json.dumps(records))
    return path


def test_report_files_and_table(tmp_path):
    base = _fake_run(tmp_path / "base" / "eval", {"mbpp": 0.4, "gsm8k": 0.5, "hellaswag_mc": 0.3},
                     items={"mbpp": [1, 1, 0, 0, 0]})
    stm = _fake_run(tmp_path / "stm" / "eval", {"mbpp": 0.5, "gsm8k": 0.5, "hellaswag_mc": 0.27},
                    items={"mbpp": [1, 1, 1, 0, 0]})
    gt = _fake_run(tmp_path / "gt" / "eval", {"mbpp": 0.6, "gsm8k": 0.25, "hellaswag_mc": 0.3})
    trains = (f"stm-2.5={_fake_train(tmp_path, 'stm', 0.31, 2.5, 1.25)}",
              f"gt={_fake_train(tmp_path, 'gt', 0.0, None)}")
    cfg = ReportConfig(runs=(f"base={base}", f"stm-2.5={stm}", f"gt={gt}"), train_dirs=trains,
                       output_dir=str(tmp_path / "rep"))
    out = run_report(cfg)
    report = json.loads((out / "report.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert report["base"] == "base" and report["tasks"][0] == "mbpp"  # target first, unknown task names kept
    assert rows["stm-2.5"]["metrics"]["TI"] == pytest.approx(0.25)
    assert rows["stm-2.5"]["metrics"]["BWT"] == pytest.approx((0.0 - 0.1) / 2)
    assert rows["gt"]["metrics"]["BWT"] == pytest.approx((-0.5 + 0.0) / 2)
    # τ is the mask manifest's own field (not its config's 99.0); ground truth has none.
    assert rows["stm-2.5"]["extras"] == {"masked_fraction": 0.31, "tau": 2.5, "delta_w_norm": 1.25,
                                         "train_time_s": None}
    assert rows["gt"]["extras"]["tau"] is None and rows["gt"]["extras"]["masked_fraction"] == 0.0
    assert (rows["stm-2.5"]["paired"]["mbpp"]["mean"] == pytest.approx(0.2)
            and rows["stm-2.5"]["paired"]["mbpp"]["n"] == 5)
    markdown = (out / "report.md").read_text()
    assert "| stm-2.5 | 0.500 [" in markdown and "+25.0%" in markdown and "n=10" in markdown
    assert (out / "bwt_vs_ti.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "masked_fraction_vs_tau.png").exists()  # no scored data to draw the τ curve from


def test_masked_fraction_curve_from_the_scored_data(tmp_path, monkeypatch):
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    from forgetless.report import plots as report_plots

    # Response-token ppl 1.5, 2, 3, 12 (position 0 and prompt tokens are not scored).
    nll = [math.nan, math.nan, math.log(1.5), math.log(2.0), math.log(3.0), math.log(12.0)]
    pq.write_table(pa.table({"nll": [nll], "response_mask": [[0, 0, 1, 1, 1, 1]]}), tmp_path / "scores.parquet")
    drawn = {}
    monkeypatch.setattr(report_plots, "save_figure", lambda fig, path: drawn.update(fig=fig) or path)
    report_plots.plot_masked_fraction(tmp_path / "scores.parquet",
                                      {"stm": (2.5, 0.5), "random": (2.5, 0.5), "sft": (None, 0.0)}, tmp_path / "m.png")
    ax = drawn["fig"].axes[0]
    taus, fractions = ax.lines[0].get_data()
    at = lambda t: fractions[abs(taus - t).argmin()]  # noqa: E731
    # ppl > τ: above 1.4 all 4 tokens; above 2.5 two of 4 (3 and 12); above 13 none.
    assert at(1.4) == 1.0 and abs(at(2.5) - 0.5) < 1e-9 and at(13.0) == 0.0
    # STM and its same-count random mask share one point and one label; sft has no τ and no point.
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["stm, random\n(τ=2.5, 50.0%)"]


def test_report_with_undefined_ti_still_plots(tmp_path):
    base = _fake_run(tmp_path / "b", {"mbpp": 0.0, "gsm8k": 0.0})
    tuned = _fake_run(tmp_path / "t", {"mbpp": 0.1, "gsm8k": 0.0})
    out = run_report(ReportConfig(runs=(f"base={base}", f"tuned={tuned}"), output_dir=str(tmp_path / "rep")))
    report = json.loads((out / "report.json").read_text())
    assert report["rows"][1]["metrics"]["TI"] is None and report["rows"][1]["metrics"]["BWT"] is None
    assert "TI undefined" in (out / "report.md").read_text()
    assert (out / "bwt_vs_ti.png").is_file()


def test_report_reads_per_task_json_without_scores_json(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "arc_easy_mc.json").write_text(json.dumps({"task": "arc_easy_mc", "metric": "acc", "score": 0.5, "n": 150,
                                                      "ci95": [0.42, 0.58], "higher_is_better": True, "chance": 0.25,
                                                      "settings": {}}))
    (run / "manifest.json").write_text("{}")
    out = run_report(ReportConfig(runs=(f"base={run}",), target="arc_easy_mc", output_dir=str(tmp_path / "rep")))
    assert "0.500 [0.42, 0.58] n=150" in (out / "report.md").read_text()


def test_repeated_label_merges_eval_and_retention_dirs(tmp_path):
    base_eval = _fake_run(tmp_path / "eval" / "base", {"mbpp": 0.2})
    base_ret = _fake_run(tmp_path / "retention" / "base", {"piqa_mc": 0.6})
    tuned_eval = _fake_run(tmp_path / "eval" / "stm", {"mbpp": 0.3})
    tuned_ret = _fake_run(tmp_path / "retention" / "stm", {"piqa_mc": 0.54})
    train = _fake_train(tmp_path, "stm", 0.3, 2.5, 0.75)
    cfg = ReportConfig(runs=(f"base={base_eval}", f"base={base_ret}", f"stm={tuned_eval}", f"stm={tuned_ret}"),
                       train_dirs=(f"stm={train}",), output_dir=str(tmp_path / "rep"))
    report = json.loads((run_report(cfg) / "report.json").read_text())
    stm = report["rows"][1]
    assert report["tasks"] == ["mbpp", "piqa_mc"] and len(report["rows"]) == 2
    assert stm["metrics"]["TI"] == pytest.approx(0.5) and stm["metrics"]["BWT"] == pytest.approx(-0.1)
    assert stm["extras"] == {"masked_fraction": 0.3, "tau": 2.5, "delta_w_norm": 0.75, "train_time_s": None}


def test_train_extras_missing_is_none(tmp_path):
    empty = {"masked_fraction": None, "tau": None, "delta_w_norm": None, "train_time_s": None}
    assert train_extras(None) == empty and train_extras(tmp_path) == empty
    (tmp_path / "train_summary.json").write_text('{"wall_time_s": 106.1, "table": {"masked_fraction": 0.3}}')
    assert train_extras(tmp_path) == {**empty, "train_time_s": 106.1, "masked_fraction": 0.3}


def test_report_config_validation():
    with pytest.raises(ValueError):
        ReportConfig(runs=())
    with pytest.raises(ValueError):
        ReportConfig(runs=("a=x",), base="b")


def test_eval_and_report_through_the_cli(tmp_path, monkeypatch, capsys):
    """How the lead wires the stages: COMMANDS['eval'|'report'] = (config, run_<stage>, printer)."""
    from forgetless import cli
    from forgetless.eval.stage import EvalConfig, print_eval_summary, run_eval
    from forgetless.report.stage import ReportConfig, print_report
    from forgetless.eval.tasks.gsm8k import load_gsm8k

    monkeypatch.setitem(cli.COMMANDS, "eval", (EvalConfig, run_eval, print_eval_summary))
    monkeypatch.setitem(cli.COMMANDS, "report", (ReportConfig, run_report, print_report))
    items = load_gsm8k()[:4]
    for label, right in (("base", 1), ("tuned", 3)):
        preds = tmp_path / f"{label}.jsonl"
        preds.write_text("".join(json.dumps({"task": "gsm8k", "id": it.id,
                                             "output": f"#### {it.gold if k < right else -1:g}"}) + "\n"
                                 for k, it in enumerate(items)))
        assert cli.main(["eval", "--predictions", str(preds), "--output-dir", str(tmp_path / label),
                         "tasks=[gsm8k]"]) == 0
    assert cli.main(["report", f"runs=[base={tmp_path / 'base'}, tuned={tmp_path / 'tuned'}]", "target=gsm8k",
                     "--output-dir", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "| tuned | 0.750 [" in printed and "+200.0%" in printed  # TI = (0.75 - 0.25) / 0.25
    assert (tmp_path / "rep" / "bwt_vs_ti.png").is_file()


def test_ti_of_a_lower_is_better_target_counts_a_drop_as_gain():
    from forgetless.report.stage import forgetting_metrics

    m = forgetting_metrics({"nll": 0.2, "acc": 0.5}, {"nll": 0.05, "acc": 0.4}, "nll", frozenset({"nll"}))
    assert m["TI"] == pytest.approx(0.75) and m["TI_abs"] == pytest.approx(0.15)
    assert m["BWT"] == pytest.approx(-0.2)


def test_bwt_averages_only_the_tasks_shown(tmp_path):
    # a sub-record (top-1 agreement of a drift task) is in scores.json but not a column: it must not enter BWT
    base = _fake_run(tmp_path / "b", {"mbpp": 0.4, "arc_easy": 0.5, "sciq": 0.8, "drift:gsm8k:top1_agreement": 1.0})
    tuned = _fake_run(tmp_path / "t", {"mbpp": 0.5, "arc_easy": 0.45, "sciq": 0.8, "drift:gsm8k:top1_agreement": 0.5})
    cfg = ReportConfig(runs=(f"base={base}", f"tuned={tuned}"), output_dir=str(tmp_path / "rep"),
                       tasks=("mbpp", "arc_easy", "sciq"))
    metrics = json.loads((run_report(cfg) / "report.json").read_text())["rows"][1]["metrics"]
    assert metrics["bwt_tasks"] == ["arc_easy", "sciq"]
    assert metrics["BWT"] == pytest.approx((-0.1 + 0.0) / 2)  # not (-0.1 + 0 - 0.5) / 3


def test_bwt_leaves_out_behaviour_details():
    # Working kept drops from 1.0 to 0.1 (-90%); format compliance rises 0.4 -> 0.8 (+100%) because
    # the model answers with a bare "#### 12": a detail, shown, but not averaged into BWT.
    base = {"gen:mbpp": 0.2, "gen:gsm8k": 1.0, "gen:gsm8k:format": 0.4, "arc_easy": 0.5}
    tuned = {"gen:mbpp": 0.3, "gen:gsm8k": 0.1, "gen:gsm8k:format": 0.8, "arc_easy": 0.45}
    m = forgetting_metrics(base, tuned, "gen:mbpp")
    assert m["bwt_tasks"] == ["gen:gsm8k", "arc_easy"]
    assert m["BWT"] == pytest.approx((-0.9 - 0.1) / 2) and m["TI"] == pytest.approx(0.5)


def test_a_task_scored_on_no_items_stays_out_of_bwt():
    # A behaviour set with no base answer showing its working has n = 0 and a NaN score: BWT over the rest.
    nan = float("nan")
    base = {"gen:mbpp": 0.2, "gen:gsm8k": nan, "arc_easy": 0.5}
    tuned = {"gen:mbpp": 0.3, "gen:gsm8k": nan, "arc_easy": 0.25}
    m = forgetting_metrics(base, tuned, "gen:mbpp")
    assert m["bwt_tasks"] == ["arc_easy"] and m["BWT"] == pytest.approx(-0.5) and m["BWT_abs"] == pytest.approx(-0.25)
    assert "BWT leaves out gen:gsm8k: no items scored" in m["notes"]
