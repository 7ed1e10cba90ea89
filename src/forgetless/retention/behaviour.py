"""What the tuned model *does* on a prompt set, greedy, paired item by item against the base.

Measures that score fixed text (multiple-choice log-likelihood, teacher-forced KL) miss the
forgetting that matters most after fine-tuning on short answers: the model stops doing what a
prompt asks (GSM8K: "think step by step, then #### <number>") and answers with a bare
"#### 12". Here the base and the tuned model each answer every prompt greedily (the base's
answers are cached and shared with the drift measure), and per item we record:

* ``did_what_asked`` (GSM8K's primary): the answer has at least ``MIN_WORKING`` characters of working *and* its
  last ``####`` is followed by a number, what the prompt asks for. Neither half alone says it: a bare
  ``#### 12`` has the format without the working, and an answer cut at the budget has working without the answer;
* ``working_chars``: characters before the final-answer marker (GSM8K ``####``; the whole
  answer where a source has no marker). ``working_kept = min(tuned, base) / base`` on items
  where the base wrote at least ``MIN_WORKING`` characters of working: the share of the base's
  working that survives (1 = all of it, by definition for the base itself). A secondary measure with a lean: it
  counts length, it is one-sided (writing more than the base never counts against it), and it favours answers
  that never finish (an answer cut at the budget keeps all its working);
* ``skips_working``: the tuned answer has under ``MIN_WORKING`` characters of working;
* ``format``: the answer has the format the prompt demands (GSM8K: ``#### <number>``; ARC: it
  opens with a choice letter), where a source demands one;
* ``accuracy``: the task's own answer check (GSM8K number, MATH via math-verify, ARC letter);
* ``surprise``: mean per-token NLL of the tuned model's answer (its stop token included) under
  the *base*. A changed opening counts in full here, where the teacher-forced drift averages it
  with hundreds of unchanged positions of the base's own answer. It leans toward methods that
  sharpen the base's own choices (STM trains only tokens the base already finds likely);
* on IFEval (``ifeval``): each instruction checked strict and loose (:mod:`forgetless.eval.tasks.ifeval`); the
  primary is ``prompt_level_strict_acc`` per prompt, beside ``prompt_level_loose_acc`` and the instruction-level
  ``inst_level_strict_acc`` / ``inst_level_loose_acc`` (their items are the instructions, ``<key>/<j>``);
* on a target set with tests (``mbpp-*``): ``asserts`` (the share of the item's asserts that
  pass, each run on its own in the sandbox), ``defines`` (the code runs and defines the
  requested function) and ``pass@1``. These favour no training recipe by construction: no
  recipe trains on the tests.

Records are named ``gen:<source>`` (the primary: ``did_what_asked`` on GSM8K, ``prompt_level_strict_acc`` on IFEval,
``asserts`` on a target set, else ``working_kept``) and ``gen:<source>:<metric>``. Every record's settings give the
token budget (``max_new_tokens``) and the share of answers that stopped on their own within it, the base's
(``base_finish_rate``) and the model's (``finish_rate``): a measure is read at a budget where the base finishes.
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
_NUMBER_FIRST = re.compile(r"\s*\$?\s*-?\d")
_ARC_OPENING = re.compile(r"^\W*(?:the\s+answer\s+is\s*:?\s*)?\(?([A-E])\b", re.IGNORECASE)


@dataclass(frozen=True)
class Profile:
    """How to read one source's answers."""

    marker: str | None = None  # regex: the working is the text before its first match
    format: Callable[[str], bool] | None = None
    correct: Callable[[str, dict], float] | None = None
    chance: float | None = None
    graded: bool = False  # answers are code graded by the source's tests (MBPP)
    asked: Callable[[str], bool] | None = None  # did what the prompt asked (the primary where given)
    instructions: bool = False  # IFEval: every instruction of the prompt checked (forgetless.eval.tasks.ifeval)


def _gsm8k_correct(text: str, record: dict) -> float:
    from forgetless.eval.tasks.gsm8k import extract_answer, gold_answer, numbers_equal

    return numbers_equal(extract_answer(text), gold_answer(record["answer"]))


def gsm8k_did_what_asked(text: str) -> bool:
    """At least ``MIN_WORKING`` characters of working and a final ``#### <number>`` (the last ``####``).

    >>> gsm8k_did_what_asked("She has 3 + 2 = 5 apples, so the answer is 5.\n#### 5"), gsm8k_did_what_asked("#### 12")
    (True, False)
    """
    if working_chars(text, r"####") < MIN_WORKING or "####" not in text:
        return False
    return _NUMBER_FIRST.match(text.rsplit("####", 1)[1]) is not None


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
        return Profile(marker=r"####", format=lambda t: bool(_GSM8K_FORMAT.search(t)), correct=_gsm8k_correct,
                       chance=0.0, asked=gsm8k_did_what_asked)
    if name.startswith("ifeval"):
        return Profile(instructions=True)
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
            "did_what_asked": float(profile.asked(text)) if profile.asked else None,
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
           "defines": (True, True), "pass@1": (True, True), "did_what_asked": (True, True),
           **{m: (True, True) for m in ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
                                        "inst_level_loose_acc")}}


def evaluate_behaviour(model, tokenizer, base_model=None, source: str = "gsm8k", limit: int | None = 40,
                       cache_dir=None, out_dir=None, max_new_tokens: int = 192, base_id: str | None = None,
                       is_base: bool = False, exclude: frozenset[int] = frozenset()) -> dict[str, dict]:
    """Greedy answers of ``model`` on ``source`` against the base's, one record per metric.

    ``base_model=None`` uses the PEFT adapter-disabled view of ``model``; ``is_base`` says the
    model is its own base (its answers are the cached base answers: nothing is generated twice). ``exclude``: MBPP
    task ids left out of the prompts (the tasks the model was trained on).
    """
    from forgetless.retention.basecache import base_view
    from forgetless.retention.records import make_record, write_task

    profile = profile_for(source)
    ref = base_answers(model, tokenizer, base_model, source, limit, cache_dir, max_new_tokens, base_id, exclude)
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
                "cut_at_limit": sum(not r["finished"] for r in rows), **finish_rates(stops, ref["stops"])}
    records = {}
    for metric in metrics:
        higher, binary = METRICS[metric]
        name = f"gen:{source}" if metric == primary else f"gen:{source}:{metric}"
        items = metric_items(rows, metric)
        records[name] = make_record(name, metric, [it["score"] for it in items], higher_is_better=higher, binary=binary,
                                    chance=profile.chance if metric == "accuracy" else None,
                                    bounded=metric in ("working_kept", "asserts"), settings=settings)
        if out_dir is not None:
            write_task(out_dir, records[name], items)
    return records


def finish_rates(stops: list, base_stops: list) -> dict[str, float | None]:
    """The share of answers that stopped on their own within the budget: the model's and the base's.

    >>> finish_rates([1, None], [1, 1, 1, None])
    {'finish_rate': 0.5, 'base_finish_rate': 0.75}
    """
    share = lambda xs: sum(x is not None for x in xs) / len(xs) if xs else None  # noqa: E731
    return {"finish_rate": share(stops), "base_finish_rate": share(base_stops)}


def metric_items(rows: list[dict], metric: str) -> list[dict]:
    """The items of one metric's record: a prompt each, or an instruction each for IFEval's ``inst_level_*``
    (id ``<key>/<j>``, so two models pair instruction by instruction); prompts without a value are left out."""
    if metric.startswith("inst_level_"):
        kind = metric.split("_")[2]  # strict | loose
        return [{"id": f"{r['id']}/{j}", "instruction": o["instruction"], "score": float(o[kind])}
                for r in rows for j, o in enumerate(r["instructions"])]
    return [{**r, "score": r[metric]} for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]


def metric_names(profile: Profile) -> tuple[str, list[str]]:
    """(primary metric, every metric recorded) for a source read by ``profile``."""
    if profile.graded:
        return "asserts", ["asserts", "defines", "pass@1", "surprise"]
    if profile.instructions:
        return "prompt_level_strict_acc", ["prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
                                           "inst_level_loose_acc", "surprise"]
    optional = (["format"] if profile.format else []) + (["accuracy"] if profile.correct else [])
    if profile.asked:
        return "did_what_asked", ["did_what_asked", "working_kept", "skips_working", *optional, "surprise"]
    return "working_kept", ["working_kept", "skips_working", *optional, "surprise"]


# Details left out of the report's main table (shown in its behaviour section).
_SECTION_ONLY = ("accuracy", "pass@1", "prompt_level_loose_acc", "inst_level_loose_acc")


def table_tasks(source: str) -> list[str]:
    """The main-table columns of one behaviour source: its primary record, then the details a reader
    compares at a glance (the graded target's surprise and pass@1, and accuracy, stay in the section)."""
    profile = profile_for(source)
    primary, metrics = metric_names(profile)
    details = [m for m in metrics
               if m != primary and m not in _SECTION_ONLY and not (profile.graded and m == "surprise")]
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
    if profile.instructions:
        from forgetless.eval.tasks.ifeval import check_response, prompt_scores

        for row, text, record in zip(rows, texts, ref["records"]):
            row["instructions"] = check_response(text, record)
            row.update(prompt_scores(row["instructions"]))
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
