"""Verifiers: does a generated answer solve its training example?

The interface is one function per task, ``verify(example, answer_text) -> bool``, wrapped in a
:class:`Verifier` that can also check many answers at once (MBPP runs them in parallel in the
sandbox). Tests inject a fake verifier; anything callable as ``verify(example, answer)`` works.

* ``mbpp``: the first fenced code block of the answer (else the whole answer), the task's
  ``test_imports`` and ``test_list`` asserts, run in :mod:`forgetless.eval.sandbox`.
* ``gsm8k``, ``math``: the evaluation task's own answer extraction and comparison
  (:mod:`forgetless.eval.tasks.gsm8k`, :mod:`forgetless.eval.tasks.math`), so an answer is
  verified exactly when evaluating it would score it correct. The gold is what the task's
  extraction finds in the reference (``answer`` / ``solution`` field, else the response):
  GSM8K's number after ``####``, MATH's last ``\\boxed{}``.
* ``none``: nothing is checked (every answer counts as unverified, ``None``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from forgetless.core.errors import ConfigError, DataError
from forgetless.eval.tasks import Item, get_task
from forgetless.eval.tasks import gsm8k as gsm8k_eval
from forgetless.eval.tasks import math as math_eval
from forgetless.eval.tasks.mbpp import build_program, extract_code
from forgetless.lm.data import Example

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
        raise DataError(f"example {example.id} has no 'test_list': cannot verify it as MBPP")
    return build_program(extract_code(answer), meta)


def mbpp_verifier(timeout_s: float = 10.0, workers: int | None = None) -> Verifier:
    from forgetless.eval.sandbox import SandboxLimits, run_programs

    limits = SandboxLimits(timeout_s=timeout_s)

    def many(examples: list[Example], answers: list[str]) -> list[bool]:
        results = run_programs([mbpp_program(e, a) for e, a in zip(examples, answers)], limits, workers)
        return [r.passed for r in results]

    return Verifier("mbpp", lambda e, a: many([e], [a])[0], many)


# --- GSM8K / MATH: the evaluation task decides -------------------------------------------------

# Where each task's reference answer is, and how the task reads an answer out of a text.
_REFERENCE: dict[str, tuple[str, Callable[[str], Any]]] = {
    "gsm8k": ("answer", gsm8k_eval.extract_answer),
    "math": ("solution", math_eval.extract_answer),
}


def reference_gold(task: str, example: Example) -> Any:
    """The gold answer of a training example, read by the task's own extraction (None: none found)."""
    field, extract = _REFERENCE[task]
    return extract(example.meta.get(field) or example.response)


def task_verifier(task: str) -> Verifier:
    """True when evaluation's ``task`` scores ``answer`` correct against the example's gold."""
    scorer = get_task(task)

    def one(example: Example, answer: str) -> bool:
        gold = reference_gold(task, example)
        if gold is None:
            return False
        return scorer.evaluate([answer], [Item(example.id, example.prompt_messages, gold)])[0].score == 1.0

    return Verifier(task, one)


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
        raise ConfigError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    if task == "auto":
        task = detect_task(data, example)
        logger.info("verifying answers as task %r", task)
    if task == "mbpp":
        return mbpp_verifier(timeout_s)
    if task in _REFERENCE:
        return task_verifier(task)
    return Verifier("none", None)
