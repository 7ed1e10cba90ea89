"""What the tuned model *does* on a prompt set, greedy, paired item by item against the base.

Measures that score fixed text (multiple-choice log-likelihood, teacher-forced KL) miss the
forgetting that matters most after fine-tuning on short answers: the model stops doing what a
prompt asks (GSM8K: "think step by step, then #### <number>") and answers with a bare
"#### 12". Here the base and the tuned model each answer every prompt greedily (the base's
answers are cached and shared with the drift measure), and per item we record:

* ``working_chars``: characters before the final-answer marker (GSM8K ``####``; the whole
  answer where a source has no marker). ``working_kept = min(tuned, base) / base`` on items
  where the base wrote at least ``MIN_WORKING`` characters of working: the share of the base's
  working that survives (1 = all of it, by definition for the base itself);
* ``skips_working``: the tuned answer has under ``MIN_WORKING`` characters of working;
* ``format``: the answer has the format the prompt demands (GSM8K: ``#### <number>``; ARC: it
  opens with a choice letter), where a source demands one;
* ``accuracy``: the task's own answer check (GSM8K number, MATH via math-verify, ARC letter);
* ``surprise``: mean per-token NLL of the tuned model's answer (its stop token included) under
  the *base*. A changed opening counts in full here, where the teacher-forced drift averages it
  with hundreds of unchanged positions of the base's own answer. It leans toward methods that
  sharpen the base's own choices (STM trains only tokens the base already finds likely);
* on a target set with tests (``mbpp-*``): ``asserts`` (the share of the item's asserts that
  pass, each run on its own in the sandbox), ``defines`` (the code runs and defines the
  requested function) and ``pass@1``. These favour no training recipe by construction: no
  recipe trains on the tests.

Records are named ``gen:<source>`` (the primary: ``working_kept``, or ``asserts`` on a target
set) and ``gen:<source>:<metric>``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from forgetless.retention.answers import base_answers, greedy, with_stop

logger = logging.getLogger(__name__)

MIN_WORKING = 40  # characters: less than a sentence of working counts as skipping it
_GSM8K_FORMAT = re.compile(r"####\s*\$?\s*-?\d")
_ARC_OPENING = re.compile(r"^\W*(?:the\s+answer\s+is\s*:?\s*)?\(?([A-E])\b", re.IGNORECASE)


@dataclass(frozen=True)
class Profile:
    """How to read one source's answers."""

    marker: str | None = None  # regex: the working is the text before its first match
    format: Callable[[str], bool] | None = None
    correct: Callable[[str, dict], float] | None = None
    chance: float | None = None
    graded: bool = False  # answers are code graded by the source's tests (MBPP)


def _gsm8k_correct(text: str, record: dict) -> float:
    from forgetless.eval.tasks.gsm8k import extract_answer, gold_answer, numbers_equal

    return numbers_equal(extract_answer(text), gold_answer(record["answer"]))


def _math_correct(text: str, record: dict) -> float:
    from forgetless.eval.tasks.math import answers_equivalent, extract_answer, last_boxed

    gold = last_boxed(record.get("solution", ""))
    return 0.0 if gold is None else answers_equivalent(extract_answer(text), gold)


def _arc_correct(text: str, record: dict) -> float:
    match = _ARC_OPENING.match(text)
    return float(match is not None and match.group(1).upper() == record["answerKey"])


def profile_for(source: str) -> Profile:
    """The reading of a source's answers, by its name (unknown sources: length and surprise only)."""
    name = source.split(":")[-1].lower()
    if name.startswith("gsm8k"):
        return Profile(marker=r"####", format=lambda t: bool(_GSM8K_FORMAT.search(t)), correct=_gsm8k_correct, chance=0.0)
    if name.startswith("math"):
        return Profile(correct=_math_correct, chance=0.0)
    if name.startswith("arc"):
        return Profile(format=lambda t: _ARC_OPENING.match(t) is not None, correct=_arc_correct, chance=0.25)
    if name.startswith("mbpp"):
        return Profile(graded=True)
    return Profile()


def working_chars(text: str, marker: str | None) -> int:
    """Characters of working: before the first ``marker`` match (stripped), else the whole answer.

    >>> working_chars("10 cans at $.5 is $5.\\n#### 5", r"####")
    21
    >>> working_chars("#### 12", r"####"), working_chars("no marker here", r"####")
    (0, 14)
    """
    match = re.search(marker, text) if marker else None
    return len((text[: match.start()] if match else text).strip())


def answer_features(text: str, profile: Profile, record: dict) -> dict[str, float | None]:
    """Per-answer quantities that need only the answer (see the module docstring)."""
    work = working_chars(text, profile.marker)
    return {"chars": len(text.strip()), "working_chars": work, "skips_working": float(work < MIN_WORKING),
            "format": float(profile.format(text)) if profile.format else None,
            "accuracy": float(profile.correct(text, record)) if profile.correct else None}


def working_kept(tuned_working: int, base_working: int) -> float | None:
    """Share of the base's working that survives; None where the base wrote too little to lose.

    >>> working_kept(50, 200), working_kept(300, 200), working_kept(0, 10)
    (0.25, 1.0, None)
    """
    if base_working < MIN_WORKING:
        return None
    return min(tuned_working, base_working) / base_working


@torch.no_grad()
def answer_surprise(base_model_view, tokenizer, prompts: list[list[int]], answers: list[list[int]],
                    batch_size: int = 8) -> list[float]:
    """Mean per-token NLL of each answer under ``base_model_view`` (NaN for an empty answer).

    The LM head runs only on the answer rows (:func:`forgetless.core.logits.token_nll`). Under a launcher the
    batches are shared among the processes (:mod:`forgetless.lm.distributed`).
    """
    from forgetless.core.logits import token_nll
    from forgetless.lm import distributed
    from forgetless.lm.batching import right_pad

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(base_model_view.parameters()).device
    out = {i: math.nan for i, a in enumerate(answers) if not a}
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    keep = sorted((i for i, a in enumerate(answers) if a), key=lambda i: -lengths[i])
    for rows in distributed.share([keep[s : s + batch_size] for s in range(0, len(keep), batch_size)], lengths):
        ids, attn = right_pad([prompts[i] + answers[i] for i in rows], pad)
        scored = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            scored[r, len(prompts[i]) : len(prompts[i]) + len(answers[i])] = 1
        nll = token_nll(base_model_view, ids.to(device), attn.to(device), scored.to(device)).cpu()
        for r, i in enumerate(rows):
            out[i] = float(nll[r][scored[r].bool()].double().mean())
    return distributed.gather(out, len(answers))


# metric -> (higher is better, binary)
METRICS = {"working_kept": (True, False), "skips_working": (False, True), "format": (True, True),
           "accuracy": (True, True), "surprise": (False, False), "asserts": (True, False),
           "defines": (True, True), "pass@1": (True, True)}


def evaluate_behaviour(model, tokenizer, base_model=None, source: str = "gsm8k", limit: int | None = 40,
                       cache_dir=None, out_dir=None, max_new_tokens: int = 192, base_id: str | None = None,
                       is_base: bool = False) -> dict[str, dict]:
    """Greedy answers of ``model`` on ``source`` against the base's, one record per metric.

    ``base_model=None`` uses the PEFT adapter-disabled view of ``model``; ``is_base`` says the
    model is its own base (its answers are the cached base answers: nothing is generated twice).
    """
    from forgetless.retention.basecache import base_view
    from forgetless.retention.records import make_record, write_task

    profile = profile_for(source)
    ref = base_answers(model, tokenizer, base_model, source, limit, cache_dir, max_new_tokens, base_id)
    if is_base:
        answers, stops = ref["answers"], ref["stops"]
    else:
        answers, stops = greedy(model, tokenizer, ref["prompts"], max_new_tokens, f"answers {source}")
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    base_texts = [tokenizer.decode(a, skip_special_tokens=True) for a in ref["answers"]]
    was_training = model.training
    model.eval()
    with base_view(model, base_model) as base:
        surprise = answer_surprise(base, tokenizer, ref["prompts"], [with_stop(a, s) for a, s in zip(answers, stops)])
    model.train(was_training)
    rows = answer_rows(profile, ref, texts, base_texts, stops, surprise)
    primary, metrics = metric_names(profile)
    settings = {"source": source, "limit": limit, "max_new_tokens": max_new_tokens, "base": ref["key"]["base"],
                "min_working_chars": MIN_WORKING, "median_chars": _median([r["chars"] for r in rows]),
                "median_working_chars": _median([r["working_chars"] for r in rows]),
                "base_median_working_chars": _median([r["base_working_chars"] for r in rows]),
                "cut_at_limit": sum(not r["finished"] for r in rows)}
    records = {}
    for metric in metrics:
        higher, binary = METRICS[metric]
        name = f"gen:{source}" if metric == primary else f"gen:{source}:{metric}"
        scored = [r for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]
        records[name] = make_record(name, metric, [r[metric] for r in scored], higher_is_better=higher, binary=binary,
                                    chance=profile.chance if metric == "accuracy" else None,
                                    bounded=metric in ("working_kept", "asserts"), settings=settings)
        if out_dir is not None:
            write_task(out_dir, records[name], [{**r, "score": r[metric]} for r in scored])
    return records


def metric_names(profile: Profile) -> tuple[str, list[str]]:
    """(primary metric, every metric recorded) for a source read by ``profile``."""
    if profile.graded:
        return "asserts", ["asserts", "defines", "pass@1", "surprise"]
    optional = (["format"] if profile.format else []) + (["accuracy"] if profile.correct else [])
    return "working_kept", ["working_kept", "skips_working", *optional, "surprise"]


# Details left out of the report's main table (shown in its behaviour section).
_SECTION_ONLY = ("accuracy", "pass@1")


def table_tasks(source: str) -> list[str]:
    """The main-table columns of one behaviour source: its primary record, then the details a reader
    compares at a glance (the graded target's surprise and pass@1, and accuracy, stay in the section)."""
    profile = profile_for(source)
    primary, metrics = metric_names(profile)
    details = [m for m in metrics if m != primary and m not in _SECTION_ONLY and not (profile.graded and m == "surprise")]
    return [f"gen:{source}"] + [f"gen:{source}:{m}" for m in details]


def answer_rows(profile: Profile, ref: dict, texts: list[str], base_texts: list[str], stops: list,
                surprise: list[float]) -> list[dict]:
    """One row per prompt: the answer's features, the base's working, and (graded sets) the test grades."""
    rows = []
    for i, (text, base_text, record) in enumerate(zip(texts, base_texts, ref["records"])):
        mine, theirs = answer_features(text, profile, record), answer_features(base_text, profile, record)
        rows.append({"id": ref["ids"][i], **mine, "base_working_chars": theirs["working_chars"],
                     "working_kept": working_kept(mine["working_chars"], theirs["working_chars"]),
                     "surprise": surprise[i], "finished": stops[i] is not None, "answer": text})
    if profile.graded:
        for row, grade in zip(rows, grade_shared(texts, ref["records"])):
            row.update({"asserts": grade["asserts"], "defines": grade["defines"], "pass@1": grade["passed"]})
    return rows


def grade_shared(texts: list[str], records: list[dict]) -> list[dict]:
    """The MBPP grades of each answer by its tests; under a launcher the answers are shared among the processes."""
    from forgetless.eval.sandbox import SandboxLimits
    from forgetless.eval.tasks.mbpp import grade_outputs
    from forgetless.lm import distributed

    mine = [i for [i] in distributed.share([[i] for i in range(len(texts))], [len(t) + 1 for t in texts])]
    # The processes of one machine split its CPUs: more programs at once would run into the time limit.
    workers = max(1, min(len(mine), (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    grades = grade_outputs([texts[i] for i in mine], [records[i] for i in mine], SandboxLimits(timeout_s=5.0), workers)
    return distributed.gather(dict(zip(mine, grades)), len(texts))


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
