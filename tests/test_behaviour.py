"""Behaviour on non-target prompts and graded target success: hand-computed features, the
sandboxed assert grader, McNemar, and the measure end to end on a tiny model."""

from __future__ import annotations

import math

import pytest

from forgetless.retention.behaviour import (MIN_WORKING, answer_features, evaluate_behaviour, finish_rates,
                                            gsm8k_did_what_asked, metric_items, profile_for, working_chars,
                                            working_kept)
from forgetless.core.intervals import mcnemar_exact
from forgetless.eval.tasks.mbpp import grade_outputs, parse_grade, requested_function

GSM8K_RECORD = {"answer": "He needs 10 cans because 80 / 8 = 10\n#### 5"}


def test_gsm8k_features_by_hand():
    profile = profile_for("gsm8k")
    working = "He needs 80 / 8 = 10 cans, and 10 cans at $0.5 cost $5 in all."  # 62 characters
    f = answer_features(working + "\n#### 5", profile, GSM8K_RECORD)
    assert f["working_chars"] == 62 and f["skips_working"] == 0.0
    assert f["format"] == 1.0 and f["accuracy"] == 1.0
    bare = answer_features("#### 12", profile, GSM8K_RECORD)
    assert (bare["working_chars"] == 0 and bare["skips_working"] == 1.0 and bare["format"] == 1.0
            and bare["accuracy"] == 0.0)
    # No marker: the whole answer is working, the format is missing; the last number is the answer.
    loose = answer_features("So the answer is 5.", profile, GSM8K_RECORD)
    assert (loose["working_chars"] == 19 and loose["skips_working"] == 1.0 and loose["format"] == 0.0
            and loose["accuracy"] == 1.0)
    assert answer_features("#### twelve", profile, GSM8K_RECORD)["format"] == 0.0


def test_working_kept_by_hand():
    assert working_kept(50, 200) == 0.25
    assert working_kept(300, 200) == 1.0  # longer working keeps all of the base's, no more
    assert working_kept(0, MIN_WORKING) == 0.0
    assert working_kept(100, MIN_WORKING - 1) is None  # the base showed no working to lose
    assert working_chars("  step one.  #### 3 #### 4", r"####") == len("step one.")


def test_arc_profile_reads_the_opening_letter():
    profile = profile_for("arc_challenge-test")
    record = {"answerKey": "C"}
    assert answer_features("C. Planetary days will become shorter, because ...", profile, record)["accuracy"] == 1.0
    opened = answer_features("The answer is (B).", profile, record)
    assert opened["format"] == 1.0 and opened["accuracy"] == 0.0
    assert answer_features("Planets rotate.", profile, record)["format"] == 0.0
    assert profile_for("mbpp-validation").graded and not profile_for("gsm8k").graded


def test_mcnemar_exact_by_hand():
    # 8 discordant prompts all one way: 2 * 0.5^8 = 0.0078125; 9: 0.00390625.
    assert mcnemar_exact(8, 0) == pytest.approx(0.0078125)
    assert mcnemar_exact(0, 9) == pytest.approx(0.00390625)
    # 3 vs 1: 2 * (C(4,0) + C(4,1)) / 16 = 0.625
    assert mcnemar_exact(3, 1) == pytest.approx(0.625)
    assert mcnemar_exact(2, 2) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_graded_mbpp_counts_each_assert_in_the_sandbox():
    record = {"test_list": ["assert f(1) == 2", "assert f(2) == 3", "assert f(3) == 5"], "test_imports": []}
    outputs = [
        "```python\ndef f(x):\n    return x + 1\n```",              # 2 of 3 asserts (f(3) is 4)
        "```python\ndef f(x):\n    return {1: 2, 2: 3, 3: 5}[x]\n```",  # all 3
        "I cannot write code.",                                     # no definition
        "```python\ndef g(x):\n    return x\n```",                  # runs, wrong name
        "```python\ndef f(x):\n    while True:\n        pass\n```",   # defines f, every assert hangs
    ]
    grades = grade_outputs(outputs, [record] * len(outputs))
    assert [g["asserts"] for g in grades] == pytest.approx([2 / 3, 1.0, 0.0, 0.0, 0.0])
    assert [g["defines"] for g in grades] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert [g["passed"] for g in grades] == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_grade_parsing_and_requested_function():
    out = "FORGETLESS-GRADE def 1\nnoise\nFORGETLESS-GRADE test 0 1\nFORGETLESS-GRADE test 2 1\n"
    assert parse_grade(out, 4) == {"defines": 1.0, "asserts": 0.5, "passed": 0.0}
    assert parse_grade("", 3) == {"defines": 0.0, "asserts": 0.0, "passed": 0.0}
    assert requested_function(["assert find_Min_Sum(12) == 7"]) == "find_Min_Sum"
    assert requested_function(["assert set(similar_elements((3, 4), (5, 4))) == set((4,))"]) == "similar_elements"
    assert requested_function(["assert math.isclose(area(2), 4.0)"]) == "area"


def _perturb(model, scale=0.5):
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.add_(torch.randn_like(layer.mlp.down_proj.weight) * scale)


def test_behaviour_of_the_base_against_itself_and_of_a_changed_model(tokenizer, tmp_path):
    from conftest import build_model

    from forgetless.retention.records import read_task

    base, tuned = build_model(len(tokenizer), seed=3), build_model(len(tokenizer), seed=3)
    kw = dict(source="gsm8k", limit=3, cache_dir=tmp_path / "cache", max_new_tokens=24)
    same = evaluate_behaviour(base, tokenizer, base, out_dir=tmp_path / "base", is_base=True, **kw)
    assert set(same) == {"gen:gsm8k", "gen:gsm8k:working_kept", "gen:gsm8k:skips_working", "gen:gsm8k:format",
                         "gen:gsm8k:accuracy", "gen:gsm8k:surprise"}
    assert same["gen:gsm8k"]["metric"] == "did_what_asked"
    # Random tiny weights write no marker: never what was asked; the whole answer is working, kept in full.
    assert same["gen:gsm8k"]["score"] == 0.0 and same["gen:gsm8k"]["n"] == 3
    assert all(v == 1.0
               for v in (it["score"] for it in read_task(tmp_path / "base", "gen:gsm8k:working_kept")[1].values()))
    # 24 random tokens never stop: the base finished none of its answers within the budget, and it says so.
    assert (same["gen:gsm8k"]["settings"]["base_finish_rate"] == 0.0
            and same["gen:gsm8k"]["settings"]["max_new_tokens"] == 24)
    # The same weights answering as a "tuned" model reproduce the base: nothing changed.
    again = evaluate_behaviour(tuned, tokenizer, base, out_dir=tmp_path / "same", **kw)
    assert again["gen:gsm8k:surprise"]["score"] == pytest.approx(same["gen:gsm8k:surprise"]["score"], abs=1e-5)
    assert again["gen:gsm8k:skips_working"]["score"] == same["gen:gsm8k:skips_working"]["score"]
    _perturb(tuned)
    moved = evaluate_behaviour(tuned, tokenizer, base, out_dir=tmp_path / "moved", **kw)
    items = read_task(tmp_path / "moved", "gen:gsm8k:surprise")[1]
    base_items = read_task(tmp_path / "base", "gen:gsm8k:surprise")[1]
    # Greedy answers are the base's own argmax path: anything else is more surprising to the base.
    assert all(items[i]["score"] >= base_items[i]["score"] - 1e-6 for i in items)
    assert moved["gen:gsm8k:surprise"]["score"] > same["gen:gsm8k:surprise"]["score"]
    assert all(not math.isnan(it["score"]) for it in items.values())


def test_behaviour_on_a_graded_target_set(tokenizer, tmp_path):
    from conftest import build_model

    model = build_model(len(tokenizer), seed=4)
    records = evaluate_behaviour(model, tokenizer, model, source="mbpp-validation", limit=2, cache_dir=None,
                                 out_dir=tmp_path, max_new_tokens=8, is_base=True)
    assert set(records) == {"gen:mbpp-validation", "gen:mbpp-validation:defines", "gen:mbpp-validation:pass@1",
                            "gen:mbpp-validation:surprise"}
    assert records["gen:mbpp-validation"]["metric"] == "asserts" and records["gen:mbpp-validation"]["n"] == 2
    assert records["gen:mbpp-validation"]["score"] == 0.0  # eight random tokens pass no test


def test_bounded_share_gets_an_interval_inside_zero_one():
    from forgetless.retention.records import make_record

    # One of five prompts keeps its working. Normal interval: 0.2 ± 1.96·0.447/√5 = [-0.19, 0.59].
    # Bootstrap: a resample mean is 0 with chance 0.8^5 = 0.33 (> 2.5%), >= 0.6 with chance 0.058
    # and >= 0.8 with 0.0067, so the 2.5% and 97.5% points are 0 and 0.6.
    rec = make_record("gen:gsm8k", "working_kept", [0.0, 0.0, 0.0, 0.0, 1.0], higher_is_better=True, bounded=True)
    assert rec["score"] == pytest.approx(0.2) and rec["ci95"] == pytest.approx([0.0, 0.6])
    assert make_record("x", "m", [0.0, 0.0, 0.0, 0.0, 1.0], higher_is_better=True)["ci95"][0] < 0


def test_no_successes_is_at_the_floor_exactly():
    from forgetless.core.intervals import wilson_interval
    from forgetless.report.retention import above_chance

    # 0 of 12 (the base's GSM8K accuracy on the demo): the lower bound is 0, not 2.8e-17.
    assert [wilson_interval(0, n)[0] for n in (3, 12, 16)] == [0.0, 0.0, 0.0]
    assert [wilson_interval(n, n)[1] for n in (3, 12, 16)] == [1.0, 1.0, 1.0]
    assert not above_chance({"ci95": list(wilson_interval(0, 12)), "chance": 0.0})


def test_gsm8k_did_what_was_asked_by_hand():
    working = "He needs 80 / 8 = 10 cans, and 10 cans at $0.5 cost $5 in all."  # 62 characters of working
    assert gsm8k_did_what_asked(working + "\n#### 5") and gsm8k_did_what_asked(working + "\n#### $1,250.50")
    assert not gsm8k_did_what_asked("#### 12")                          # the format without the working
    assert not gsm8k_did_what_asked(working)                            # working, cut before the answer
    assert not gsm8k_did_what_asked(working + "\n#### five")            # no number after the marker
    assert not gsm8k_did_what_asked("Short: 3+2.\n#### 5")               # 11 characters: under MIN_WORKING
    assert not gsm8k_did_what_asked(working + "\n#### 5\nThen again #### ?")  # the final marker has no number
    assert (gsm8k_did_what_asked("x" * MIN_WORKING + "#### -3")
            and not gsm8k_did_what_asked("x" * (MIN_WORKING - 1) + "#### 3"))
    assert answer_features(working + "\n#### 5", profile_for("gsm8k"), GSM8K_RECORD)["did_what_asked"] == 1.0
    assert answer_features("#### 5", profile_for("math-test"), {})["did_what_asked"] is None


def test_finish_rates_by_hand():
    # stops: an id where the answer stopped on its own, None where the budget cut it.
    assert finish_rates([2, None, None, 2], [2, 2, 2, 2, 2, None, 2, 2, 2, 2]) == {"finish_rate": 0.5,
                                                                                   "base_finish_rate": 0.9}
    assert finish_rates([], []) == {"finish_rate": None, "base_finish_rate": None}


def test_ifeval_items_are_prompts_or_instructions():
    rows = [{"id": "7", "prompt_level_strict_acc": 0.0,
             "instructions": [{"instruction": "a", "strict": False, "loose": True},
                              {"instruction": "b", "strict": True, "loose": True}]},
            {"id": "9", "prompt_level_strict_acc": 1.0,
             "instructions": [{"instruction": "a", "strict": True, "loose": True}]}]
    assert [(i["id"], i["score"]) for i in metric_items(rows, "inst_level_strict_acc")] == [("7/0", 0.0), ("7/1", 1.0),
                                                                                            ("9/0", 1.0)]
    assert [i["score"] for i in metric_items(rows, "inst_level_loose_acc")] == [1.0, 1.0, 1.0]
    assert [(i["id"], i["score"]) for i in metric_items(rows, "prompt_level_strict_acc")] == [("7", 0.0), ("9", 1.0)]


def test_behaviour_on_ifeval_paired_per_prompt(tokenizer, tmp_path):
    from conftest import build_model

    from forgetless.retention.records import read_task

    model = build_model(len(tokenizer), seed=5)
    records = evaluate_behaviour(model, tokenizer, model, source="ifeval", limit=3, cache_dir=None, out_dir=tmp_path,
                                 max_new_tokens=8, is_base=True)
    assert set(records) == {"gen:ifeval", "gen:ifeval:prompt_level_loose_acc", "gen:ifeval:inst_level_strict_acc",
                            "gen:ifeval:inst_level_loose_acc", "gen:ifeval:surprise"}
    assert records["gen:ifeval"]["metric"] == "prompt_level_strict_acc" and records["gen:ifeval"]["n"] == 3
    # The first three IFEval prompts (keys 1000, 1001, 1005) carry 3 + 1 + 1 instructions.
    assert records["gen:ifeval:inst_level_strict_acc"]["n"] == 5
    items = read_task(tmp_path, "gen:ifeval")[1]
    assert list(items) == ["1000", "1001", "1005"]
    assert all({"instruction", "strict", "loose"} <= set(o) for it in items.values() for o in it["instructions"])
