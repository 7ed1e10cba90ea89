"""MATH (the paper's 1000 test problems): answer equivalence with ``math-verify`` (offline and
deterministic, where the authors used a paid LLM judge). Gold: the last ``\\boxed{}`` of the
solution. The prompt is the record's (the authors' *training* prompt, ending in 'Answer: $', so a
bare answer continues a math span); ``math-paper`` (:mod:`forgetless.eval.tasks.paper`) asks with
the authors' evaluation prompt and reads their 'Answer:' line."""

from __future__ import annotations

from forgetless.core.errors import DataError
from forgetless.lm.data import load_records
from forgetless.eval.tasks import Item, Task, first_human_turn, stable_id


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i]
    return None


def extract_answer(output: str) -> str:
    """The boxed answer if any, else the text itself (math-verify then finds the last expression)."""
    boxed = last_boxed(output)
    if boxed is not None:
        return boxed
    # The prompt opened a '$': a bare answer like '3600$' closes it.
    return "$" + output if output.count("$") % 2 == 1 else output


def answers_equivalent(pred: str, gold: str) -> float:
    """1.0 when math-verify finds ``pred`` equal to ``gold`` (read as LaTeX math, then as given)."""
    from math_verify import parse, verify

    if " ".join(pred.split()) == " ".join(gold.split()):
        return 1.0
    gold_parsed = parse("$" + gold + "$")
    if not gold_parsed:
        return 0.0
    for candidate in ("$" + pred + "$", pred):
        parsed = parse(candidate)
        if parsed and verify(gold_parsed, parsed):
            return 1.0
    return 0.0


def load_math(source: str = "math-test") -> list[Item]:
    records, _ = load_records(source)
    items = []
    for r in records:
        gold = last_boxed(r["solution"])
        if gold is None:
            raise DataError(f"MATH record without \\boxed answer: {r['problem'][:80]!r}")
        items.append(Item(id=stable_id("math", r["problem"]), messages=first_human_turn(r), gold=gold, record=r))
    return items


def math_task() -> Task:
    return Task(name="math", metric="math_verify", load=load_math, extract=lambda o, it: extract_answer(o),
                score=lambda pred, it: answers_equivalent(pred, it.gold), max_new_tokens=512, chance=0.0)
