"""Report columns from records (hand-made), and the stage end to end on a tiny saved model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import Crash
from forgetless.retention.records import make_record, write_task
from forgetless.report.retention import markdown_table, plot_drift_vs_gain, summarize_run


def _mc(out, task, scores, chance):
    rec = make_record(task, "acc", scores, higher_is_better=True, chance=chance, binary=True)
    write_task(out, rec, [{"id": str(i), "score": s} for i, s in enumerate(scores)])


def _drift(out, source, score):
    rec = make_record(f"drift:{source}", "kl_base_tuned", [score] * 4, higher_is_better=False)
    write_task(out, rec, [{"id": str(i), "score": score} for i in range(4)])


def test_bwt_counts_only_tasks_above_chance(tmp_path):
    base, run = tmp_path / "base", tmp_path / "run"
    _mc(base, "arc_easy", [1.0] * 10, 0.25)  # above chance
    _mc(run, "arc_easy", [1.0] * 8 + [0.0] * 2, 0.25)
    _mc(base, "boolq", [1.0] * 5 + [0.0] * 5, 0.5)  # at chance: listed, not counted
    _mc(run, "boolq", [0.0] * 10, 0.5)
    for d in (base, run):
        _drift(d, "gsm8k", 0.0 if d == base else 0.2)
        _drift(d, "math-test", 0.0 if d == base else 0.4)
    s = summarize_run(base, run)
    assert s["tasks"]["boolq"]["above_chance"] is False and s["tasks"]["arc_easy"]["above_chance"] is True
    assert s["bwt_tasks"] == 1 and s["bwt"]["score"] == pytest.approx(-0.2)
    lo, hi = s["bwt"]["ci95"]
    assert lo < -0.2 < hi
    assert s["mc_retention"]["score"] == pytest.approx(1 - 0.2 / 0.75)
    assert s["drift"]["kl_base_tuned"]["score"] == pytest.approx(0.3)
    assert s["drift"]["kl_base_tuned"]["sources"] == ["drift:gsm8k", "drift:math-test"]
    table = markdown_table({"ground truth": s})
    assert "| ground truth | — | — | -0.200 [" in table  # no target or behaviour records: their columns are empty
    plot_drift_vs_gain({"ground truth": s}, tmp_path / "p.png")  # no gain column: empty plot, no error
    assert (tmp_path / "p.png").stat().st_size > 0


def test_run_retention_end_to_end_on_tiny_models(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetless.retention.stage import RetentionConfig, run_retention

    base_dir, tuned_dir = tiny_model_dir, tmp_path / "tuned-model"
    tuned = AutoModelForCausalLM.from_pretrained(base_dir)  # the base with one layer moved
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.add_(0.3)
    tuned.save_pretrained(tuned_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tuned_dir)
    common = dict(mc_tasks=("piqa",), mc_limit=3, drift_sources=("gsm8k",), drift_limit=1, max_new_tokens=3,
                  top_k=8, heldout_limit=2, cache_dir=str(tmp_path / "cache"), device="cpu", dtype="float32")
    out_base = run_retention(RetentionConfig(model=str(base_dir), output_dir=str(tmp_path / "r0"), **common))
    out_run = run_retention(RetentionConfig(model=str(tuned_dir), base_model=str(base_dir),
                                            output_dir=str(tmp_path / "r1"), **common))
    manifest = json.loads((out_run / "manifest.json").read_text())
    assert "drift:gsm8k" in manifest["tasks"] and "heldout:mbpp-validation:kept" in manifest["tasks"]
    assert json.loads((out_base / "drift__gsm8k.json").read_text())["score"] == 0.0
    s = summarize_run(out_base, out_run)
    assert s["drift"]["kl_base_tuned"]["score"] > 0
    assert "gain_all" in s["target"] and "piqa:acc_norm" in s["tasks"]  # piqa's primary metric
    with pytest.raises(ValueError):
        RetentionConfig(mc_tasks=("nope",))
    with pytest.raises(ValueError):
        RetentionConfig(tau=0.5)


def _gen(out, task, metric, scores, higher=True, binary=False, settings=None):
    rec = make_record(task, metric, scores, higher_is_better=higher, binary=binary, settings=settings)
    write_task(out, rec, [{"id": str(i), "score": s} for i, s in enumerate(scores)])


def test_behaviour_columns_target_gain_sign_and_between_methods(tmp_path):
    from forgetless.report.behaviour import behaviour_markdown

    base, sft, stm = tmp_path / "base", tmp_path / "sft", tmp_path / "stm"
    _gen(base, "gen:gsm8k", "working_kept", [1.0] * 10)
    _gen(sft, "gen:gsm8k", "working_kept", [0.0] * 8 + [1.0] * 2)
    _gen(stm, "gen:gsm8k", "working_kept", [1.0] * 9 + [0.5])
    _gen(base, "gen:gsm8k:skips_working", "skips_working", [0.0] * 10, higher=False, binary=True)
    _gen(sft, "gen:gsm8k:skips_working", "skips_working", [1.0] * 8 + [0.0] * 2, higher=False, binary=True)
    _gen(stm, "gen:gsm8k:skips_working", "skips_working", [0.0] * 10, higher=False, binary=True)
    for d, v in ((base, 0.2), (sft, 0.3), (stm, 0.5)):
        _gen(d, "gen:mbpp-validation", "asserts", [v] * 10)
    # A lower-is-better target (held-out NLL): a drop of 0.13 is a gain of +0.13, not -0.13.
    for d, v in ((base, 1.0), (sft, 0.87), (stm, 0.87)):
        _gen(d, "heldout:mbpp-validation:kept", "nll", [v] * 10, higher=False,
             settings={"kind": "kept", "change": v - 1.0, "change_ci95": [v - 1.0] * 2, "base_score": 1.0})
    s_nll = summarize_run(base, stm, target_task="heldout:mbpp-validation:kept")
    assert s_nll["target"]["gain_target"]["score"] == pytest.approx(0.13)
    summaries = {name: summarize_run(base, d, target_task="gen:mbpp-validation")
                 for name, d in (("sft", sft), ("stm", stm))}
    assert summaries["stm"]["target"]["gain_target"]["score"] == pytest.approx(0.3)
    assert summaries["sft"]["working_kept"]["score"] == pytest.approx(0.2)
    assert summaries["stm"]["working_kept"]["score"] == pytest.approx(0.95)
    assert summaries["sft"]["behaviour"]["gen:gsm8k:skips_working"]["score"] == pytest.approx(0.8)
    text = behaviour_markdown(summaries, {"sft": sft, "stm": stm})
    # sft skips the working on 8 prompts where stm does not, never the reverse: p = 2 / 2^8.
    assert "| sft vs stm | -0.75 [" in text and "| 8 / 0 | 0.00781 |" in text
    table = markdown_table(summaries)
    assert "| stm | +0.300 [" in table and "favours STM" in table


def test_a_crashed_retention_stage_keeps_the_measures_it_finished(tiny_model_dir, tmp_path, monkeypatch):
    import forgetless.retention.drift as drift
    import forgetless.retention.heldout as heldout
    import forgetless.retention.mc as mc
    from forgetless.retention.progress import PROGRESS_FILE
    from forgetless.retention.stage import RetentionConfig, run_retention

    common = dict(model=str(tiny_model_dir), mc_tasks=("piqa",), mc_limit=3, drift_sources=("gsm8k",),
                  drift_limit=1, max_new_tokens=3, top_k=8, heldout_limit=2, cache_dir=str(tmp_path / "cache"),
                  device="cpu", dtype="float32")
    whole = run_retention(RetentionConfig(output_dir=str(tmp_path / "whole"), **common))
    calls, crash = [], [True]

    def counting(name, real):
        def counted(*args, **kwargs):
            calls.append(name)
            if name == "evaluate_heldout" and crash:
                crash.clear()
                raise Crash  # the process dies in the last measure, once
            return real(*args, **kwargs)
        return counted

    for module, name in ((mc, "evaluate_mc"), (drift, "evaluate_drift"), (heldout, "evaluate_heldout")):
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    config = RetentionConfig(output_dir=str(tmp_path / "cut"), **common)
    with pytest.raises(Crash):
        run_retention(config)
    assert calls == ["evaluate_mc", "evaluate_drift", "evaluate_heldout"]
    assert not (tmp_path / "cut" / "manifest.json").exists()
    calls.clear()
    out = run_retention(config)  # the same settings: only the unfinished measure runs
    assert calls == ["evaluate_heldout"]
    for name in ("piqa", "drift__gsm8k", "heldout__mbpp-validation__kept"):
        assert (out / f"{name}.json").read_text() == (whole / f"{name}.json").read_text(), name
    calls.clear()
    run_retention(RetentionConfig(output_dir=str(tmp_path / "cut"), **{**common, "mc_limit": 2}))
    assert calls == ["evaluate_mc", "evaluate_drift", "evaluate_heldout"]  # other settings: measured again
    assert json.loads((out / PROGRESS_FILE).read_text())["done"]["mc:piqa"][0] == "piqa"  # the records it wrote
