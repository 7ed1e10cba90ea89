"""The authors' evaluation protocol (forgetless.eval.tasks.paper): each prompt equals the authors'
for one item, written out here by hand from their scripts; extraction on hand-written outputs."""

from __future__ import annotations

import pytest

from forgetless.eval.sandbox import SandboxLimits
from forgetless.eval.stage import EvalConfig, resolve_task
from forgetless.eval.tasks import Item, get_task
from forgetless.eval.tasks.paper import (arc_paper_answer, gsm8k_final_answer, math_paper_answer, mbpp_paper_code,
                                         mbpp_paper_prompt, mbpp_test_plus_task)
from forgetless.lm.data import DataError, load_records


def scores(task, outputs: list[str], item: Item) -> list[float]:
    return [s.score for s in task.evaluate(outputs, [item] * len(outputs))]


def test_limits_are_the_authors():
    assert {n: get_task(n).max_new_tokens
            for n in ("gsm8k-test", "math-paper", "arc_challenge-paper", "mbpp-test")} == \
        {"gsm8k-test": 512, "math-paper": 512, "arc_challenge-paper": 512, "mbpp-test": 1024}
    assert get_task("mbpp-test").definition["timeout_s"] == 10.0
    # The eval stage passes its sandbox settings on (their default is the authors' 10 s).
    assert resolve_task("mbpp-test", EvalConfig(sandbox_timeout_s=3)).definition["timeout_s"] == 3


def test_gsm8k_test_is_the_full_split_with_the_authors_prompt():
    task = get_task("gsm8k-test")
    items = task.load()
    assert len(items) == 1319 and len({it.id for it in items}) == 1319
    first = items[0]
    # instruction_prompt.strip() + 'Q: ' + question + '\nA:' (run_gsm8k.py): no newline before 'Q:'.
    assert first.messages == [{"role": "user", "content":
        "You are given a grade school math question. Please answer the question in the following format:\n\n"
        "Q: <Question>\nA: <Think step by step here> #### <number only answer>\n\n"
        "Format requirements : you must first output your reasoning before finalized with the \" #### \" format "
        "followed by the final numeric answerQ: Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast "
        "every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' "
        "market daily for $2 per fresh duck egg. How much in dollars does she make every day at "
        "the farmers' market?\nA:"}]
    assert first.gold == 18  # 16 - 3 - 4 = 9 eggs at $2
    right, wrong = "16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18", "9 + 2 = 11\n#### 11"
    missing = "She makes 18 dollars a day."  # no '####': the last line, 'She makes 18 dollars a day.', is no integer
    assert scores(task, [right, wrong, missing], first) == [1.0, 0.0, 0.0]
    # The authors' reading: the last line after '####'; ',', '$', '%', 'g' removed; int() or the string.
    assert gsm8k_final_answer("#### $1,234") == 1234
    assert gsm8k_final_answer("#### 18\nThat is all.") == "That is all."  # the last line, not the number
    assert gsm8k_final_answer("no marker\n18") == 18  # a bare number on the last line counts
    assert gsm8k_final_answer("#### 18.0") == "18.0"  # not an integer: never equal to the gold 18
    assert gsm8k_final_answer("#### 5 kg") == "5 k"


def test_math_paper_prompt_and_answer_line():
    task = get_task("math-paper")
    items = task.load()
    assert len(items) == 1000
    first = items[0]
    assert first.messages[0]["content"] == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $ANSWER (without quotes) where $ANSWER is the answer to the problem.\n\n"
        "A $3491$ by $3491$ square has its length decreased by $60$ and its width increased by $60$.  "
        "By how much does its area change?\n\n"
        "Remember to put your answer on its own line after \"Answer:\", and you do not need to use a \\boxed command.")
    assert first.gold == "3600"  # (3491-60)(3491+60) - 3491^2 = -3600: the solution boxes the decrease
    right = "The area is 3491^2 - 60^2, so it decreases by 3600.\nAnswer: 3600"
    assert scores(task, [right, "Answer: 3599", "I cannot solve this.", r"so $\boxed{3600}$"], first) == \
        [1.0, 0.0, 0.0, 1.0]
    # The first 'Answer:' line wins, in any case; the rest of that line is the answer.
    assert math_paper_answer("answer: 1/2\nAnswer: 3") == "1/2"
    assert math_paper_answer("Final ANSWER:  $\\frac{1}{2}$ \nok") == "$\\frac{1}{2}$ "


def test_arc_paper_prompt_and_letter():
    task = get_task("arc_challenge-paper")
    items = task.load()
    assert len(items) == 1172
    first = items[0]
    # run_arc.py's templated(): 'Question:\n' + question + 'Choices:\n' (no newline between) + choices + '\n'.
    assert first.messages[0]["content"] == (
        "Answer the following multiple choice question. The last line of your response should be of the following "
        "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD.\n"
        "Question:\nAn astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?Choices:\n"
        "A. Planetary density will decrease.\nB. Planetary years will become longer.\n"
        "C. Planetary days will become shorter.\nD. Planetary gravity will become stronger.\n")
    assert first.gold == "C"
    outputs = ["Faster rotation means shorter days.\nAnswer: C", "Answer: B", "I am not sure.", "C", "Answer: $C$"]
    assert scores(task, outputs, first) == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert arc_paper_answer("I am not sure.") == "I"  # read as 'Answer: I am not sure.'
    assert arc_paper_answer("") is None
    # 'Answer:' without the space after it is not seen, so 'Answer: ' is put in front: the first word is 'Answer'.
    assert arc_paper_answer("**Answer:** C") == "Answer"
    assert arc_paper_answer("Answer: \uff23") == "C"  # a full-width letter


MBPP_PLUS_RECORD = {  # MBPP+'s shape: sanitized prompt, the shown asserts, and a test harness of its own
    "task_id": 2, "prompt": "Write a function to find the shared elements from the given two lists.",
    "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
    "test": "import numpy as np\n\ndef assertion(out, exp, atol):\n"
            "    assert out == exp or np.allclose(out, exp, atol=atol)\n\n"
            "inputs = [[(3, 4, 5, 6), (5, 7, 4, 10)], [(1, 2), (3, 4)]]\nresults = [(4, 5), ()]\n"
            "for inp, exp in zip(inputs, results):\n    assertion(tuple(sorted(similar_elements(*inp))), exp, 0)\n",
}


def test_mbpp_test_plus_prompt_extraction_and_grading():
    assert mbpp_paper_prompt(MBPP_PLUS_RECORD) == (
        "Please refer the given test cases and generate a python function for my problem. Make sure the written code "
        "is wrapped in code block : ```python\n<your code>\n```\n>>> Problem:\nWrite a function to find the shared "
        "elements from the given two lists.\n>>> Test Cases:\n"
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n")
    # The same formula made the bundled splits' training prompts.
    validation, _ = load_records("mbpp-validation")
    assert all(mbpp_paper_prompt(r) == r["conversations"][0]["value"] for r in validation)
    item = Item("mbpp-2", [{"role": "user", "content": mbpp_paper_prompt(MBPP_PLUS_RECORD)}], [], MBPP_PLUS_RECORD)
    right = "Here:\n```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```\nDone."
    wrong = "```python\ndef similar_elements(a, b):\n    return tuple(a)\n```"
    missing = "I would intersect the two sets."
    # the fence stays in the code
    unclosed = "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
    task = mbpp_test_plus_task(SandboxLimits(timeout_s=20))
    assert scores(task, [right, wrong, missing, unclosed], item) == [1.0, 0.0, 0.0, 0.0]
    assert mbpp_paper_code(right) == "def similar_elements(a, b):\n    return tuple(set(a) & set(b))"
    assert mbpp_paper_code("``` python\nx = 1\n```") == "x = 1"  # a 'python' tag after a space is dropped too


def test_mbpp_test_plus_offline_names_what_is_missing(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'evalplus/mbppplus' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"mbpp-test-plus \(MBPP\+, 378 tasks with MBPP\+'s tests\) is not shipped "
                                         r".*\(hf:evalplus/mbppplus\)"):
        get_task("mbpp-test-plus").load()
