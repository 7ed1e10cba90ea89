"""Text-to-SQL (BIRD/Spider style): execution accuracy against the user's SQLite databases.

Items: records with ``question``, gold ``SQL`` (or ``query``/``sql``), ``db_id`` and optional
``evidence``; the database is ``<db_root>/<db_id>/<db_id>.sqlite`` (BIRD/Spider layout) or
``<db_root>/<db_id>.sqlite``/``.db``. A prediction is right when its result rows, as a set,
equal the gold query's (BIRD's rule). Queries run read-only, with an authorizer that allows only
reads and a time limit, so a generated query cannot change or hang the database.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from forgetless.core.errors import DataError
from forgetless.lm.data import load_records
from forgetless.eval.tasks import Item, Scored, Task, stable_id

PROMPT = ("-- SQLite database schema:\n{schema}\n\n{evidence}-- Question: {question}\n"
          "Write one SQLite query that answers the question. Reply with the query in a ```sql code block.")
FENCE = re.compile(r"```[ \t]*(?:sql|sqlite|SQL)?[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}


def find_database(db_root: str | Path, db_id: str) -> Path:
    root = Path(db_root)
    for candidate in (root / db_id / f"{db_id}.sqlite", root / f"{db_id}.sqlite", root / f"{db_id}.db"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no SQLite database for db_id {db_id!r} under {root}")


def connect_readonly(path: Path, timeout_s: float) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    conn.set_authorizer(lambda action, *args: sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY)
    deadline = time.monotonic() + timeout_s
    # A non-zero return aborts the statement: the time limit for runaway queries.
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    return conn


def execute(path: Path, query: str, timeout_s: float = 5.0) -> list[tuple]:
    conn = connect_readonly(path, timeout_s)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def schema_text(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND sql IS NOT NULL "
                            "ORDER BY name").fetchall()
    finally:
        conn.close()
    return "\n".join(r[0].strip() + ";" for r in rows)


def extract_sql(output: str) -> str:
    blocks = [b for b in FENCE.findall(output) if b.strip()]
    if blocks:
        return blocks[0].strip()
    match = re.search(r"\b(SELECT|WITH)\b.*", output, flags=re.IGNORECASE | re.DOTALL)
    text = match.group(0) if match else output
    return text.split(";")[0].strip()


def execution_match(pred_sql: str, item: Item, timeout_s: float = 5.0) -> tuple[float, str]:
    """(1.0, 'match') when the predicted rows equal the gold rows as sets; else 0.0 and why."""
    path = Path(item.record["_db_path"])
    gold_rows = execute(path, item.gold, timeout_s)  # a broken gold query is the data's fault: raise
    try:
        pred_rows = execute(path, pred_sql, timeout_s)
    except sqlite3.Error as e:
        return 0.0, f"error: {e}"[:200]
    return (1.0, "match") if set(pred_rows) == set(gold_rows) else (0.0, "different rows")


def load_sql(data: str, db_root: str, prompt: str = PROMPT) -> list[Item]:
    records, _ = load_records(data)
    schemas: dict[str, str] = {}
    items = []
    for r in records:
        gold = r.get("SQL", r.get("query", r.get("sql")))
        if gold is None or "question" not in r or "db_id" not in r:
            raise DataError(f"{data}: a text-to-SQL record needs 'question', 'db_id' and 'SQL' (or 'query')")
        path = find_database(db_root, r["db_id"])
        if r["db_id"] not in schemas:
            schemas[r["db_id"]] = schema_text(path)
        evidence = f"-- External knowledge: {r['evidence']}\n" if r.get("evidence") else ""
        text = prompt.format(schema=schemas[r["db_id"]], evidence=evidence, question=r["question"])
        item_id = str(r.get("id", r.get("question_id", stable_id("sql", r["db_id"] + r["question"]))))
        items.append(Item(id=item_id, messages=[{"role": "user", "content": text}], gold=gold,
                          record={**r, "_db_path": str(path)}))
    return items


def sql_task(data: str, db_root: str, name: str = "sql", timeout_s: float = 5.0, max_new_tokens: int = 256) -> Task:
    def score_batch(outputs: list[str], items: list[Item]) -> list[Scored]:
        scored = []
        for output, item in zip(outputs, items):
            query = extract_sql(output)
            score, why = execution_match(query, item, timeout_s)
            scored.append(Scored(query, score, why))
        return scored

    return Task(score_batch=score_batch, name=name, metric="execution_accuracy", load=lambda: load_sql(data, db_root),
                extract=lambda o, it: extract_sql(o),
                score=lambda pred, it: execution_match(pred, it, timeout_s)[0],
                max_new_tokens=max_new_tokens, chance=0.0,
                definition={"data": str(data), "db_root": str(db_root), "prompt": PROMPT, "timeout_s": timeout_s})
