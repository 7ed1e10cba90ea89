"""Evaluation tasks as declarative data: where the items come from, the prompt, the gold answer,
answer extraction and the metric. One small file per task; :func:`get_task` looks one up by
name, or loads a user's YAML/JSON definition (see :mod:`forgetless.eval.tasks.custom`).

A task's ``score_batch`` gets every item's output at once, so tasks that execute code or SQL
can run items in parallel; the default scores one item at a time with ``score``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from forgetless.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from forgetless.eval.sandbox import SandboxLimits


@dataclass(frozen=True)
class Item:
    """One evaluation item: a stable id (to pair two models' results), the prompt, the gold answer."""

    id: str
    messages: list[dict[str, str]]
    gold: Any
    record: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Scored:
    extracted: Any
    score: float
    detail: str | None = None


@dataclass(frozen=True)
class Task:
    """A benchmark. ``extract(output, item)`` pulls the answer out of a generation;
    ``score(extracted, item)`` in [0, 1]."""

    name: str
    metric: str
    load: Callable[[], list[Item]]
    extract: Callable[[str, Item], Any]
    score: Callable[[Any, Item], float]
    max_new_tokens: int
    chance: float | None = None
    higher_is_better: bool = True
    version: str = "1"
    score_batch: Callable[[list[str], list[Item]], list[Scored]] | None = None
    definition: dict[str, Any] = field(default_factory=dict)  # what a user's file said, for the hash
    # Further metrics of the whole set beside ``metric`` (IFEval's four): name -> {"score", "n", "ci95"}.
    metrics: Callable[[list[Scored]], dict[str, dict[str, Any]]] | None = None
    # Installed packages that read or score answers (their versions are part of the hash), e.g. IFEval's verifier.
    packages: tuple[str, ...] = ()

    def evaluate(self, outputs: list[str], items: list[Item]) -> list[Scored]:
        if len(outputs) != len(items):
            raise ValueError(f"{self.name}: {len(outputs)} outputs for {len(items)} items")
        if self.score_batch is not None:
            return self.score_batch(outputs, items)
        scored = []
        for output, item in zip(outputs, items):
            extracted = self.extract(output, item)
            scored.append(Scored(extracted, float(self.score(extracted, item))))
        return scored

    def code_modules(self) -> tuple[str, ...]:
        """The modules that define this task's functions (lambdas included: their module is where they are written)."""
        fns = (self.extract, self.score, self.score_batch, self.load, self.metrics)
        return tuple(sorted({fn.__module__ for fn in fns if fn is not None and getattr(fn, "__module__", None)}))

    def definition_hash(self) -> str:
        """Changes when the code that loads, reads or scores the items changes: the source files of the task's
        modules and every ``forgetless.eval`` module they import (answer-reading helpers, the sandbox), the
        versions of ``packages``, or the user's definition (:mod:`forgetless.lm.codehash`)."""
        from importlib import metadata

        from forgetless.lm.codehash import code_digest

        versions = []
        for package in self.packages:
            try:
                versions.append(f"{package}=={metadata.version(package)}")
            except metadata.PackageNotFoundError:
                versions.append(f"{package} missing")
        parts = [self.name, self.metric, self.version, str(self.max_new_tokens),
                 json.dumps(self.definition, sort_keys=True, default=str),
                 code_digest(self.code_modules(), within=("forgetless.eval",)), *versions]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def select_items(items: list[Item], limit: int | None, seed: int | None) -> list[Item]:
    """The first ``limit`` items (seed None), or a seeded random subset kept in file order."""
    if limit is None or limit >= len(items):
        return list(items)
    if seed is None:
        return items[:limit]
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [item for i, item in enumerate(items) if i in keep]


def items_fingerprint(items: list[Item]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.id, item.messages, item.gold], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def stable_id(prefix: str, text: str) -> str:
    """An id from content, for records without one (GSM8K, MATH): survives reordering."""
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def first_human_turn(record: dict[str, Any]) -> list[dict[str, str]]:
    """The paper's prompt: the first human turn of ``conversations``."""
    for turn in record["conversations"]:
        if turn.get("from") in ("human", "user"):
            return [{"role": "user", "content": turn["value"]}]
    raise DataError("record has no human turn in 'conversations'")


# The paper tasks follow the authors' own evaluation scripts (forgetless.eval.tasks.paper).
PAPER = ("gsm8k-test", "math-paper", "arc_challenge-paper", "mbpp-test", "mbpp-test-plus")
BUILTIN = ("mbpp", "gsm8k", "math", "arc_challenge", "ifeval", *PAPER)


def get_task(spec: str, limits: SandboxLimits | None = None) -> Task:
    """A built-in task by name (:data:`BUILTIN`) or a YAML/JSON definition file. ``limits``: the sandbox limits of
    the MBPP tasks, which run the answers (None: each task's default)."""
    if spec == "mbpp":
        from forgetless.eval.tasks.mbpp import mbpp_task

        return mbpp_task(limits)
    if spec == "mbpp-test":
        from forgetless.eval.tasks.paper import mbpp_test_task

        return mbpp_test_task(limits)
    if spec == "mbpp-test-plus":
        from forgetless.eval.tasks.paper import mbpp_test_plus_task

        return mbpp_test_plus_task(limits)
    if spec == "gsm8k":
        from forgetless.eval.tasks.gsm8k import gsm8k_task

        return gsm8k_task()
    if spec == "math":
        from forgetless.eval.tasks.math import math_task

        return math_task()
    if spec == "ifeval":
        from forgetless.eval.tasks.ifeval import ifeval_task

        return ifeval_task()
    if spec in PAPER:
        from forgetless.eval.tasks.paper import paper_task

        return paper_task(spec)
    if spec in ("arc_challenge", "arc"):
        from forgetless.eval.tasks.arc import arc_task

        return arc_task()
    if Path(spec).suffix in (".yaml", ".yml", ".json") and Path(spec).is_file():
        from forgetless.eval.tasks.custom import load_task_file

        return load_task_file(spec)
    hint = (" (text-to-SQL needs a definition file with 'type: sql': see forgetless.eval.tasks.sql)"
            if spec == "sql" else "")
    raise ConfigError(f"unknown task {spec!r}: use one of {', '.join(BUILTIN)} or a .yaml/.json task definition{hint}")
