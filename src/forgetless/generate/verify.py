"""Verifiers: does a generated answer solve its training example?

The interface is one function per task, ``verify(example, answer_text) -> bool``, wrapped in a
:class:`Verifier` that can also check many answers at once (MBPP runs them in parallel in the
sandbox). Tests inject a fake verifier; anything callable as ``verify(example, answer)`` works.

* ``mbpp``: the first fenced code block of the answer (else the whole answer), the task's
  ``test_imports`` and ``test_list`` asserts, run in :mod:`forgetless.eval.sandbox`.
* ``gsm8k``: math-verify match of the answer against the number after ``####`` in the reference.
* ``math``: math-verify match against the last ``\\boxed{}`` of the reference solution.
* ``none``: nothing is checked (every answer counts as unverified, ``None``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from forgetless.lm.data import Example
from forgetless.eval.tasks.math import last_boxed
from forgetless.eval.tasks.mbpp import build_program, extract_code

logger = logging.getLogger(__name__)

TASKS = ("auto", "mbpp", "gsm8k", "math", "none")

CheckOne = Callable[[Example, str], bool]
CheckMany = Callable[[list[Example], list[str]], list[bool]]


@dataclass(frozen=True)
class Verifier:
    """A task's answer checker; ``many`` defaults to calling ``one`` on each pair."""

    name: str
    one: CheckOne | None
    many_fn: CheckMany | None = None

    def __call__(self, example: Example, answer: str) -> bool | None:
        if self.one is None:
            return None
        return bool(self.one(example, answer))

    def many(self, examples: list[Example], answers: list[str]) -> list[bool | None]:
        if self.one is None:
            return [None] * len(answers)
        if self.many_fn is not None:
            return [bool(v) for v in self.many_fn(examples, answers)]
        return [bool(self.one(e, a)) for e, a in zip(examples, answers)]


def as_verifier(check: Verifier | CheckOne, name: str = "custom") -> Verifier:
    """Wrap a plain ``verify(example, answer) -> bool`` function (tests, user code)."""
    return check if isinstance(check, Verifier) else Verifier(name, check)


# --- MBPP -----------------------------------------------------------------------------------

def mbpp_program(example: Example, answer: str) -> str:
    """The program the sandbox runs: imports, the answer's code, the task's asserts."""
    meta = example.meta
    if not meta.get("test_list"):
        raise ValueError(f"example {example.id} has no 'test_list': cannot verify it as MBPP")
    return build_program(extract_code(answer), meta)


def mbpp_verifier(timeout_s: float = 10.0, workers: int | None = None) -> Verifier:
    from forgetless.eval.sandbox import SandboxLimits, run_programs

    limits = SandboxLimits(timeout_s=timeout_s)

    def many(examples: list[Example], answers: list[str]) -> list[bool]:
        results = run_programs([mbpp_program(e, a) for e, a in zip(examples, answers)], limits, workers)
        return [r.passed for r in results]

    return Verifier("mbpp", lambda e, a: many([e], [a])[0], many)


# --- GSM8K / MATH ---------------------------------------------------------------------------

def gsm8k_gold(example: Example) -> str:
    reference = example.meta.get("answer") or example.response
    return reference.split("####")[-1].strip().replace(",", "")


def math_gold(example: Example) -> str:
    reference = example.meta.get("solution") or example.response
    boxed = last_boxed(reference)
    return f"${boxed}$" if boxed is not None else reference


def math_match(gold_text: str, answer: str) -> bool:
    from math_verify import parse, verify

    gold = parse(gold_text if "$" in gold_text or "\\" in gold_text else f"${gold_text}$")
    return bool(gold) and bool(verify(gold, parse(answer)))


def gsm8k_verifier() -> Verifier:
    return Verifier("gsm8k", lambda e, a: math_match(gsm8k_gold(e), a))


def math_verifier() -> Verifier:
    return Verifier("math", lambda e, a: math_match(math_gold(e), a))


# --- choosing -------------------------------------------------------------------------------

def detect_task(data: str, example: Example) -> str:
    """The task of a data set, from its name or, failing that, from its records' fields."""
    name = data.lower().rsplit("/", 1)[-1]
    for task in ("mbpp", "gsm8k", "math"):
        if name.startswith(task):
            return task
    meta = example.meta
    if meta.get("test_list"):
        return "mbpp"
    if "solution" in meta:
        return "math"
    if "####" in str(meta.get("answer", "")):
        return "gsm8k"
    return "none"


def make_verifier(task: str, data: str, example: Example, timeout_s: float = 10.0) -> Verifier:
    """The verifier for ``task`` (``auto``: detected from ``data`` and ``example``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    if task == "auto":
        task = detect_task(data, example)
        logger.info("verifying answers as task %r", task)
    if task == "mbpp":
        return mbpp_verifier(timeout_s)
    if task == "gsm8k":
        return gsm8k_verifier()
    if task == "math":
        return math_verifier()
    return Verifier("none", None)
