"""From sampled answers to a training set: the answer each prompt keeps, what becomes of a prompt
none of whose answers passed (``on_failure``), and the counts.

The authors (``generate_self-output_training_data.py``) kept the lowest-perplexity answer that
passed the task's tests and dropped every prompt without one, so their Self-Output and Rephrase
sets are smaller than the ground truth's. ``on_failure="drop"`` does the same;
``"ground_truth"`` keeps such a prompt with its reference answer (``provenance.fallback``).
"""

from __future__ import annotations

import math
import random

from forgetless.core.errors import ConfigError
from forgetless.generate.paper import choose_answer
from forgetless.lm.data import Example

ON_FAILURE = ("drop", "ground_truth")


def select_answer(record: dict, choose: str, seed: int) -> dict | None:
    """The kept sample of one prompt: among the verified ones (all non-empty ones when nothing is
    checked), by ``choose``."""
    rows = [r for r in record["samples"] if r["mean_nll"] is not None]
    candidates = [r for r in rows if r["verified"] is True] or [r for r in rows if r["verified"] is None]
    if not candidates:
        return None
    ranked = [{"ppl": math.exp(r["mean_nll"])} for r in candidates]
    return candidates[choose_answer(ranked, choose, random.Random(f"{seed}:{record['id']}"))]


def assemble(examples: list[Example], done: dict[str, dict], method: str, choose: str, seed: int) -> list[Example]:
    """Each prompt with its chosen sample, or with its ground truth marked ``fallback`` where none passed."""
    out = []
    for ex in examples:
        record = done[ex.id]
        pick = select_answer(record, choose, seed)
        n_ok = sum(r["verified"] is True for r in record["samples"])
        if pick is None:
            answer = ex.response
            provenance = {"source": "ground_truth", "sample_index": None, "verified": record["ground_truth_verified"],
                          "fallback": True}
        else:
            answer = pick["text"]
            provenance = {"source": method, "sample_index": pick["index"], "verified": pick["verified"],
                          "fallback": False}
        provenance.update(samples=len(record["samples"]), verified_samples=n_ok)
        out.append(Example(ex.id, [*ex.prompt_messages, {"role": "assistant", "content": answer}],
                           {**ex.meta, "provenance": provenance}))
    return out


def apply_on_failure(assembled: list[Example], on_failure: str) -> list[Example]:
    """The training set: prompts without a passing answer dropped (``drop``) or kept with their
    reference (``ground_truth``)."""
    if on_failure not in ON_FAILURE:
        raise ConfigError(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {on_failure!r}")
    return [ex for ex in assembled if on_failure == "ground_truth" or not ex.meta["provenance"]["fallback"]]


def outcome_statistics(assembled: list[Example], kept: list[Example]) -> dict:
    """How many prompts had no passing answer (with ``task=none``: no non-empty one), how many of
    those were dropped or kept with their reference."""
    failed = sum(ex.meta["provenance"]["fallback"] for ex in assembled)
    fallbacks = sum(ex.meta["provenance"]["fallback"] for ex in kept)
    return {
        "prompts": len(assembled),
        "prompts_without_passing_answer": failed,
        "dropped": len(assembled) - len(kept),
        "fallbacks": fallbacks,
        "fallback_rate": fallbacks / max(len(assembled), 1),
        "training_examples": len(kept),
    }


def generation_statistics(examples: list[Example], done: dict[str, dict], assembled: list[Example], kept: list[Example],
                          seconds: float) -> dict:
    records = [done[ex.id] for ex in examples]
    samples = [s for r in records for s in r["samples"]]
    return {
        **outcome_statistics(assembled, kept),
        "samples": len(samples),
        "empty_samples": sum(s["mean_nll"] is None for s in samples),
        "unfinished_samples": sum(not s["finished"] for s in samples),
        "verified_samples": sum(s["verified"] is True for s in samples),
        "prompts_with_verified_sample": sum(any(s["verified"] is True for s in r["samples"]) for r in records),
        "ground_truth_verified": sum(r["ground_truth_verified"] is True for r in records),
        "new_tokens": sum(s["new_tokens"] for s in samples),
        "seconds_this_run": round(seconds, 1),
    }


def paper_statistics(assembled: list[Example], kept: list[Example]) -> dict:
    prov = [ex.meta["provenance"] for ex in assembled]
    return {**outcome_statistics(assembled, kept), "prompts_with_verified_sample": sum(not p["fallback"] for p in prov),
            "accepted_answers": sum(p["accepted"] for p in prov), "rejected_answers": sum(p["rejected"] for p in prov)}
