"""GSM8K on the authors' 747-item *validation* split (their ``dataset/ground_truth/gsm8k``, which
their ``run_gsm8k.py --run_val`` scores checkpoints on): numeric exact match on the final answer.

The prompt is the record's first human turn (the authors' training prompt: reasoning, then
``#### <number>``); the gold is what follows '####'. Extraction takes the number after the last
'####', else the last number in the output. The paper's reported GSM8K numbers are on the full
test split, with the authors' own prompt and integer reading: task ``gsm8k-test``
(:mod:`forgetless.eval.tasks.paper`).
"""

from __future__ import annotations

import re

from forgetless.core.errors import DataError
from forgetless.lm.data import load_records
from forgetless.eval.tasks import Item, Task, first_human_turn, stable_id

NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """'1,234.50' -> 1234.5, '$5' -> 5.0, '-3' -> -3.0; None when there is no number."""
    match = NUMBER.search(text)
    if match is None:
        return None
    cleaned = match.group(0).replace(",", "").replace("$", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_answer(output: str) -> float | None:
    if "####" in output:
        value = parse_number(output.rsplit("####", 1)[1])
        if value is not None:
            return value
    numbers = NUMBER.findall(output)
    return parse_number(numbers[-1]) if numbers else None


def gold_answer(answer: str) -> float:
    value = parse_number(answer.rsplit("####", 1)[1])
    if value is None:
        raise DataError(f"GSM8K gold has no number after '####': {answer[-80:]!r}")
    return value


def numbers_equal(pred: float | None, gold: float) -> float:
    return float(pred is not None and abs(pred - gold) < 1e-6 * max(1.0, abs(gold)))


def load_gsm8k(source: str = "gsm8k") -> list[Item]:
    records, _ = load_records(source)
    return [Item(id=stable_id("gsm8k", r["question"]), messages=first_human_turn(r), gold=gold_answer(r["answer"]),
                 record=r)
            for r in records]


def gsm8k_task() -> Task:
    return Task(name="gsm8k", metric="exact_match", load=load_gsm8k, extract=lambda o, it: extract_answer(o),
                score=lambda pred, it: numbers_equal(pred, it.gold), max_new_tokens=320, chance=0.0)
