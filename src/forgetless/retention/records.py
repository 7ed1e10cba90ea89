"""The result format shared with ``forgetless eval``: one JSON record and one JSONL per task.

``<out>/<task>.json``::

    {"task": str, "metric": str, "score": float, "n": int, "ci95": [lo, hi],
     "higher_is_better": bool, "chance": float | null, "settings": {...}}

``<out>/<task>.items.jsonl``: one ``{"id": str, "score": float, ...}`` per item. Task names may
hold ``:`` (``piqa:acc_norm``, ``drift:gsm8k``); on disk it becomes ``__`` so names stay
portable. Files are written to a temporary name and renamed, so a crash never leaves a
half-written file that looks complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from forgetless.lm.artifacts import write_text
from forgetless.core.intervals import bootstrap_interval, mean_interval, wilson_interval


def task_filename(task: str) -> str:
    return task.replace(":", "__").replace("/", "_")


def make_record(task: str, metric: str, item_scores: list[float], *, higher_is_better: bool,
                chance: float | None = None, settings: dict[str, Any] | None = None,
                binary: bool = False, bounded: bool = False) -> dict[str, Any]:
    """Record of the mean of ``item_scores``: Wilson interval when ``binary``; percentile bootstrap
    when ``bounded`` (shares in [0, 1] such as the working kept: the interval stays inside the
    range, where the normal one crosses 0 on a few items near it); else normal."""
    n = len(item_scores)
    if binary:
        score = sum(item_scores) / n if n else math.nan
        lo, hi = wilson_interval(sum(item_scores), n)
    elif bounded and n:
        score, (lo, hi) = sum(item_scores) / n, bootstrap_interval(list(item_scores))
    else:
        score, lo, hi = mean_interval(item_scores)
    return {"task": task, "metric": metric, "score": score, "n": n, "ci95": [lo, hi],
            "higher_is_better": higher_is_better, "chance": chance, "settings": settings or {}}


def write_task(out_dir: str | Path, record: dict[str, Any], items: list[dict[str, Any]]) -> Path:
    """Write ``<task>.items.jsonl`` then ``<task>.json`` (the record last: it marks completion)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = task_filename(record["task"])
    write_text(out_dir / f"{stem}.items.jsonl",
                  "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    path = out_dir / f"{stem}.json"
    write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def read_task(out_dir: str | Path, task: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(record, items by id) of a task written by :func:`write_task`."""
    stem = task_filename(task)
    out_dir = Path(out_dir)
    record = json.loads((out_dir / f"{stem}.json").read_text(encoding="utf-8"))
    items = {}
    items_path = out_dir / f"{stem}.items.jsonl"
    if items_path.is_file():
        for line in items_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                items[str(item["id"])] = item
    return record, items


def list_tasks(out_dir: str | Path) -> list[str]:
    """Task names of the records in ``out_dir``."""
    names = []
    for path in sorted(Path(out_dir).glob("*.json")):
        if path.name.endswith(".items.json") or path.name in ("manifest.json", "config.json"):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "task" in record and "score" in record:
            names.append(record["task"])
    return names


def pool_records(dirs: list[str | Path], out_dir: str | Path) -> list[str]:
    """Pool the records of the same measures on several seeds of one recipe into ``out_dir``.

    Each item's score becomes its mean over the seeds (items every seed scored; NaN items are left out), so the
    interval is over items of the seed-averaged model behaviour: it shows item noise, and seed noise only as far as
    the average carries it (2 seeds cannot estimate a seed variance). ``seeds`` in each record gives the per-seed
    scores. Returns the pooled task names."""
    dirs = [Path(d) for d in dirs]
    tasks = sorted(set.intersection(*(set(list_tasks(d)) for d in dirs))) if dirs else []
    pooled = []
    for task in tasks:
        read = [read_task(d, task) for d in dirs]
        ids = sorted(set.intersection(*(set(items) for _, items in read)))
        items = []
        for item_id in ids:
            scores = [items_[item_id]["score"] for _, items_ in read]
            if any(s is None or (isinstance(s, float) and math.isnan(s)) for s in scores):
                continue
            items.append({"id": item_id, "score": sum(scores) / len(scores), "seeds": scores})
        first = read[0][0]
        if not any(items_ for _, items_ in read):  # a record without items: the mean of the seeds' scores
            record = {**first, "score": sum(r["score"] for r, _ in read) / len(read), "ci95": [math.nan, math.nan],
                      "seeds": [r["score"] for r, _ in read]}
            write_task(out_dir, record, [])
            pooled.append(task)
            continue
        record = make_record(task, first["metric"], [it["score"] for it in items],
                             higher_is_better=first["higher_is_better"], chance=first.get("chance"),
                             settings={**first.get("settings", {}), "pooled_from": [str(d) for d in dirs]},
                             bounded=True)
        record["seeds"] = [rec["score"] for rec, _ in read]
        write_task(out_dir, record, items)
        pooled.append(task)
    return pooled
