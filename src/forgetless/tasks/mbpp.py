"""MBPP (the paper's 90-item validation split): pass@1 by running the generated code and the
task's asserts in the sandbox. Prompt: the paper's (first human turn), which asks for a
```python block."""

from __future__ import annotations

import re

from forgetless.data import load_records
from forgetless.sandbox import SandboxLimits, run_programs
from forgetless.tasks import Item, Scored, Task, first_human_turn

FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(output: str) -> str:
    """The first fenced code block (an unclosed one counts: generation may stop mid-block); else the whole text."""
    blocks = [b for b in FENCE.findall(output) if b.strip()]
    return blocks[0] if blocks else output


def build_program(code: str, record: dict) -> str:
    imports = "\n".join(line for line in record.get("test_imports") or [] if line.strip())
    tests = "\n".join(record["test_list"])
    return f"{imports}\n{code}\n\n{tests}\n"


def load_mbpp(source: str = "mbpp-validation") -> list[Item]:
    records, _ = load_records(source)
    return [Item(id=f"mbpp-{r['task_id']}", messages=first_human_turn(r), gold=r["test_list"], record=r) for r in records]


def mbpp_task(limits: SandboxLimits | None = None, workers: int | None = None) -> Task:
    limits = limits or SandboxLimits()

    def score_batch(outputs: list[str], items: list[Item]) -> list[Scored]:
        codes = [extract_code(o) for o in outputs]
        results = run_programs([build_program(c, it.record) for c, it in zip(codes, items)], limits, workers)
        return [Scored(c, float(r.passed), r.status) for c, r in zip(codes, results)]

    def score_one(code: str, item: Item) -> float:
        return float(run_programs([build_program(code, item.record)], limits, 1)[0].passed)

    return Task(name="mbpp", metric="pass@1", load=load_mbpp, extract=lambda o, it: extract_code(o),
                score=score_one, score_batch=score_batch, max_new_tokens=512, chance=None,
                definition={"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb})
