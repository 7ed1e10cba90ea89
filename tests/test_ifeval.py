"""IFEval: every instruction type pinned on hand-made responses (strict and loose, a pass and a fail each), the
four lm-eval metrics on a hand-computed predictions file, and offline punkt. No network, no model."""

from __future__ import annotations

import json

import pytest

from forgetless import cli
from forgetless.eval.stage import EvalConfig, run_eval
from forgetless.eval.tasks import get_task
from forgetless.eval.tasks.ifeval import METRICS, check_response, ifeval_metrics, load_ifeval

LOWER = "this is an answer written in lowercase letters about the weather in the city today."
UPPER = LOWER.upper()
# type -> (kwargs, passes strict and loose, fails both, fails strict but passes loose or None)
CASES = {
    "punctuation:no_comma": ({}, "No commas here.", "One, two.", "Sure, here it is:\nNo commas here."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*one* and **two**", "*one* only", None),
    "length_constraints:number_words": ({"relation": "less than", "num_words": 4}, "yes no", "one two three four",
                                        "Here is my answer for you\nyes no"),
    "change_case:capital_word_frequency": ({"capital_frequency": 2, "capital_relation": "less than"},
                                           "Only ONE capital word.", "TWO CAPITAL words.",
                                           "TITLE HEADER LINE\nonly ONE here."),
    "change_case:english_capital": ({}, UPPER, LOWER, "Sure here you go:\n" + UPPER),
    "change_case:english_lowercase": ({}, LOWER, UPPER, "Answer:\n" + LOWER),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write a poem."}, "Write a poem. Roses are red.",
                                  "Roses are red.", "Sure:\nWrite a poem. Roses are red."),
    "combination:two_responses": ({}, "Answer one.\n******\nAnswer two.", "Answer one.\n******\nAnswer one.", None),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Dear [name], at [address].", "Dear [name].",
                                               None),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello.\nP.S. bye", "Hello. Bye.", None),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Yes.", None),
    "detectable_format:json_format": ({}, '```json\n{"a": 1}\n```', "a: 1", 'Here is the JSON:\n{"a": 1}'),
    "detectable_format:multiple_sections": ({"num_sections": 2, "section_spliter": "Section"},
                                            "Section 1\nfoo\nSection 2\nbar", "Section 1\nfoo", None),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one", "* one\n* two\n* three"),
    "detectable_format:title": ({}, "<<My Title>>\ntext", "My Title\ntext", None),
    "keywords:existence": ({"keywords": ["apple", "pear"]}, "An apple and a pear.", "An apple.", None),
    "keywords:forbidden_words": ({"forbidden_words": ["bad"]}, "All good.", "That is bad.",
                                 "That is bad.\nAll good."),
    "keywords:frequency": ({"keyword": "cat", "frequency": 2, "relation": "at least"}, "cat and cat", "a cat", None),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "zz top", "z top",
                                  None),
    "language:response_language": ({"language": "de"},
                                   "Das ist eine Antwort auf Deutsch, und sie ist ziemlich lang geschrieben worden.",
                                   "This is an answer written in English, and it is rather long as well.", None),
    "length_constraints:nth_paragraph_first_word": ({"first_word": "then", "nth_paragraph": 2, "num_paragraphs": 2},
                                                    "First part.\n\nThen second.", "First part.\n\nAnd second.", None),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "One.\n***\nTwo.", "One. Two.", None),
    # punkt keeps "Dr." and "p.m." inside their sentences: 2 sentences, where splitting at every period gives 4.
    "length_constraints:number_sentences": ({"num_sentences": 3, "relation": "less than"},
                                            "Dr. Smith went home at 5 p.m. yesterday. He slept.", "One. Two. Three.",
                                            "Intro line. Another one.\nDr. Smith went home. He slept."),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done.",
                             "Done. Any other questions?\n-- a signature"),
    "startend:quotation": ({}, '"Quoted answer."', "Quoted answer.", 'Here:\n"Quoted answer."'),
}


def _record(instruction: str, kwargs: dict) -> dict:
    return {"key": 1, "prompt": "p", "instruction_id_list": [instruction], "kwargs": [kwargs]}


def _outcome(instruction: str, kwargs: dict, response: str) -> tuple[bool, bool]:
    [o] = check_response(response, _record(instruction, kwargs))
    assert o["instruction"] == instruction
    return o["strict"], o["loose"]


def test_every_instruction_type_of_the_data_is_pinned_here():
    types = {t for item in load_ifeval() for t in item.gold["instruction_id_list"]}
    assert len(load_ifeval()) == 541 and types == set(CASES), sorted(types ^ set(CASES))


@pytest.mark.parametrize("instruction", sorted(CASES))
def test_instruction_pass_and_fail(instruction):
    kwargs, passes, fails, loose_only = CASES[instruction]
    assert _outcome(instruction, kwargs, passes) == (True, True)
    assert _outcome(instruction, kwargs, fails) == (False, False)
    if loose_only is not None:
        assert _outcome(instruction, kwargs, loose_only) == (False, True)


def test_an_empty_answer_fails_every_instruction():
    record = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "keywords:forbidden_words"],
              "kwargs": [{}, {"forbidden_words": ["x"]}]}
    assert [(o["strict"], o["loose"]) for o in check_response("  \n", record)] == [(False, False), (False, False)]


def test_a_checker_that_draws_a_random_argument_scores_the_same_on_every_run():
    import random

    # prompt 1129 asks for 6 or more "!": letter_frequency takes only letters, so upstream counts a random letter
    record = next(item.record for item in load_ifeval() if item.id == "1129")
    assert record["kwargs"][0]["letter"] == "!"
    answer = "Sunnis ice cream is gentle on the stomach. Try it today and tell a friend about it."
    outcomes = []
    for seed in range(5):  # whatever state the caller's random is in
        random.seed(seed)
        before = random.getstate()
        outcomes.append(check_response(answer, record))
        assert random.getstate() == before  # the caller's random is left as it was
    assert all(o == outcomes[0] for o in outcomes)


def test_punkt_is_found_offline_and_counts_sentences_as_nltk_does():
    import nltk

    from forgetless.eval.tasks.punkt_offline import ensure_punkt

    ensure_punkt()
    tokenizer = nltk.data.load("nltk:tokenizers/punkt/english.pickle")
    assert tokenizer.tokenize("Mr. Jones arrived at 5 p.m. today. He left!") == ["Mr. Jones arrived at 5 p.m. today.",
                                                                              "He left!"]


def test_metrics_by_hand():
    # prompt A: strict F,T,F / loose T,T,F; prompt B: T / T.
    a = [{"strict": False, "loose": True}, {"strict": True, "loose": True}, {"strict": False, "loose": False}]
    b = [{"strict": True, "loose": True}]
    m = ifeval_metrics([a, b])
    assert {k: (m[k]["score"], m[k]["n"]) for k in METRICS} == {
        "prompt_level_strict_acc": (0.5, 2), "prompt_level_loose_acc": (0.5, 2),
        "inst_level_strict_acc": (0.5, 4), "inst_level_loose_acc": (0.75, 4)}


def _mixed_predictions(path) -> None:
    """Key 1000: no commas, 3 highlighted sections, at least 300 words; key 1001: no commas. Two of 541 prompts."""
    answer_1000 = "Sure, here it is:\n*a* *b* *c* a short summary without the words it needs"  # loose drops line 1
    lines = [{"task": "ifeval", "id": 1000, "output": answer_1000},
             {"task": "ifeval", "id": 1001, "output": "Thou shalt travel to Kyoto and then to Nara."}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_predictions_file_subset_scores_the_four_metrics(tmp_path):
    preds = tmp_path / "preds.jsonl"
    _mixed_predictions(preds)
    out = run_eval(EvalConfig(output_dir=str(tmp_path / "ev"), tasks=("ifeval",), predictions=str(preds),
                              progress=False))
    summary = json.loads((out / "ifeval.json").read_text())
    # 1000: strict F,T,F and loose T,T,F; 1001: T and T.
    assert (summary["metric"], summary["score"], summary["n"]) == ("prompt_level_strict_acc", 0.5, 2)
    assert {k: (v["score"], v["n"]) for k, v in summary["metrics"].items()} == {
        "prompt_level_strict_acc": (0.5, 2), "prompt_level_loose_acc": (0.5, 2),
        "inst_level_strict_acc": (0.5, 4), "inst_level_loose_acc": (0.75, 4)}
    items = [json.loads(line) for line in (out / "ifeval.items.jsonl").read_text().splitlines()]
    assert [i["id"] for i in items] == ["1000", "1001"]
    assert [(o["strict"], o["loose"]) for o in items[0]["extracted"]] == [(False, True), (True, True), (False, False)]


def test_cli_eval_ifeval_predictions(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    _mixed_predictions(preds)
    assert cli.main(["eval", f"predictions={preds}", f"output_dir={tmp_path / 'ev'}", "tasks=[ifeval]"]) == 0
    printed = capsys.readouterr().out
    assert "prompt_level_strict_acc 0.500" in printed and "inst_level_loose_acc 0.750" in printed


def test_ifeval_is_a_builtin_task():
    task = get_task("ifeval")
    assert (task.name, task.metric) == ("ifeval", "prompt_level_strict_acc")


def test_punkt_model_is_written_as_one_folder(tmp_path):
    from forgetless.eval.tasks.punkt_offline import FILES, punkt_tab_files, write_punkt_tab

    target = write_punkt_tab(tmp_path)
    files = punkt_tab_files()
    assert sorted(p.name for p in target.iterdir()) == sorted(FILES)
    assert all((target / name).read_bytes() == text.encode("utf-8") for name, text in files.items())
    assert [p.name for p in target.parent.iterdir()] == ["english"]
