"""A user's own task from a small YAML or JSON file. Example::

    name: capitals                # the task's name in results
    data: capitals.jsonl          # records (relative paths are relative to this file)
    prompt: "What is the capital of {country}? Answer with the city name only."
    gold: capital                 # field holding the answer
    metric: exact_match           # exact_match | contains | numeric | math_verify | choice | sql | chrf
    extract: "(?i)answer:\\s*(.+)"  # optional regex; its first group is the answer
    max_new_tokens: 32
    id: id                        # optional field with a stable item id

Without ``prompt`` the record's own ``conversations``/``messages`` prompt is used. ``metric: sql``
takes ``db_root`` and records in the text-to-SQL format (see :mod:`forgetless.eval.tasks.sql`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from forgetless.core.errors import ConfigError, DataError
from forgetless.lm.data import load_records, normalize_record
from forgetless.eval.tasks import Item, Task, stable_id

METRICS = ("exact_match", "contains", "numeric", "math_verify", "choice", "sql", "chrf")
_KEYS = {"name", "data", "prompt", "gold", "metric", "extract", "max_new_tokens", "id", "db_root", "system", "chance",
         "choices"}


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s.-]", "", str(text).lower())).strip().rstrip(".")


def score_metric(metric: str, pred, gold) -> float:
    """Pure metric on an extracted answer and the gold (for ``sql`` see the sql task)."""
    if pred is None:
        return 0.0
    if metric == "exact_match":
        return float(normalize_text(pred) == normalize_text(gold))
    if metric == "contains":
        return float(normalize_text(gold) in normalize_text(pred))
    if metric == "numeric":
        from forgetless.eval.tasks.gsm8k import numbers_equal, parse_number

        gold_value = gold if isinstance(gold, (int, float)) else parse_number(str(gold))
        return numbers_equal(parse_number(str(pred)), float(gold_value)) if gold_value is not None else 0.0
    if metric == "math_verify":
        from forgetless.eval.tasks.math import answers_equivalent

        return answers_equivalent(str(pred), str(gold))
    if metric == "choice":
        return float(str(pred).strip().upper() == str(gold).strip().upper())
    if metric == "chrf":  # free-text answers: character n-gram F-score against the reference, in [0, 1]
        from sacrebleu.metrics import CHRF

        return CHRF().sentence_score(str(pred).strip(), [str(gold).strip()]).score / 100
    raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def _extract(definition: dict, output: str, item: Item):
    pattern = definition.get("extract")
    if definition["metric"] == "choice":
        from forgetless.eval.tasks.arc import extract_letter

        return extract_letter(output, [str(c) for c in definition.get("choices", "ABCD")])
    if definition["metric"] == "math_verify":
        from forgetless.eval.tasks.math import extract_answer

        return extract_answer(output)
    if pattern:
        match = re.search(pattern, output)
        return (match.group(1) if match.groups() else match.group(0)).strip() if match else None
    return output.strip()


def _load(definition: dict) -> list[Item]:
    records, origin = load_records(definition["data"])
    items = []
    for i, r in enumerate(records):
        if definition.get("prompt"):
            messages = [{"role": "user", "content": definition["prompt"].format(**r)}]
            if definition.get("system"):
                messages.insert(0, {"role": "system", "content": definition["system"]})
        else:
            messages = normalize_record(r, f"{origin}: record {i}")[:-1]
        if definition["gold"] not in r:
            raise DataError(f"{origin}: record {i} has no gold field {definition['gold']!r}")
        id_field = definition.get("id")
        item_id = (str(r[id_field]) if id_field and id_field in r
                   else stable_id(definition["name"], json.dumps(messages)))
        items.append(Item(id=item_id, messages=messages, gold=r[definition["gold"]], record=r))
    return items


def task_from_definition(definition: dict, base_dir: Path = Path(".")) -> Task:
    unknown = set(definition) - _KEYS
    if unknown:
        raise ConfigError(f"task definition: unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    missing = [k for k in ("name", "data", "metric") if k not in definition]
    if missing:
        raise ConfigError(f"task definition: missing {missing}")
    if definition["metric"] not in METRICS:
        raise ConfigError(f"task definition: metric {definition['metric']!r} not one of {', '.join(METRICS)}")
    definition = dict(definition)
    for key in ("data", "db_root"):
        if key in definition and not Path(definition[key]).is_absolute() and (base_dir / definition[key]).exists():
            definition[key] = str(base_dir / definition[key])
    if definition["metric"] == "sql":
        from forgetless.eval.tasks.sql import sql_task

        if "db_root" not in definition:
            raise ConfigError("task definition: metric 'sql' needs db_root")
        return sql_task(definition["data"], definition["db_root"], name=definition["name"],
                        max_new_tokens=int(definition.get("max_new_tokens", 256)))
    if "gold" not in definition:
        raise ConfigError("task definition: missing 'gold' (the field holding the answer)")
    return Task(name=definition["name"], metric=definition["metric"], load=lambda: _load(definition),
                extract=lambda o, it: _extract(definition, o, it),
                score=lambda pred, it: score_metric(definition["metric"], pred, it.gold),
                max_new_tokens=int(definition.get("max_new_tokens", 128)), chance=definition.get("chance"),
                definition=definition)


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    definition = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(definition, dict):
        raise ConfigError(f"{path}: a task definition is a mapping of keys to values")
    return task_from_definition(definition, path.parent)
