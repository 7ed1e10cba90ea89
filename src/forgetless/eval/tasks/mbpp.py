"""MBPP (the paper's 90-item validation split): pass@1 by running the generated code and the
task's asserts in the sandbox. Prompt: the paper's (first human turn), which asks for a
```python block. The authors reported MBPP on the MBPP+ test split (378 tasks, 1,024 tokens):
``mbpp-test-plus`` (from the hub) and its offline counterpart ``mbpp-test`` in
:mod:`forgetless.eval.tasks.paper`."""

from __future__ import annotations

import re

from forgetless.lm.data import load_records
from forgetless.eval.sandbox import SandboxLimits, run_programs
from forgetless.eval.tasks import Item, Scored, Task, first_human_turn

FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(output: str) -> str:
    """The first fenced code block (an unclosed one counts: generation may stop mid-block); else the whole text."""
    blocks = [b for b in FENCE.findall(output) if b.strip()]
    return blocks[0] if blocks else output


def build_program(code: str, record: dict) -> str:
    imports = "\n".join(line for line in record.get("test_imports") or [] if line.strip())
    tests = "\n".join(record["test_list"])
    return f"{imports}\n{code}\n\n{tests}\n"


GRADE_LINE = "FORGETLESS-GRADE"
_ASSERT_NAME = re.compile(r"assert\s*\(?\s*(?:set\s*\(|math\.isclose\s*\()?\s*([A-Za-z_]\w*)\s*\(")


def requested_function(tests: list[str]) -> str | None:
    """The function the first test calls: ``assert find_Min_Sum(12) == 7`` -> ``find_Min_Sum``."""
    for test in tests:
        match = _ASSERT_NAME.match(test.strip())
        if match:
            return match.group(1)
    return None


def build_graded_program(code: str, record: dict) -> str:
    """A program that runs the code, then each assert on its own, printing one grade line each.

    Partial credit survives a later assert that hangs or crashes: each line is flushed as it is
    reached. ``def <0|1>`` says whether the code ran to its end and defined the requested
    function; ``test <i> <0|1>`` whether assert i passed.
    """
    imports = "\n".join(line for line in record.get("test_imports") or [] if line.strip())
    name = requested_function(record["test_list"])
    return (f"{imports}\n"
            f"def _grade(line):\n    print({GRADE_LINE!r}, line, flush=True)\n"
            f"try:\n    exec(compile({code!r}, 'solution', 'exec'), globals())\n"
            f"    _grade('def %d' % int(callable(globals().get({name!r}))))\n"
            f"except BaseException:\n    _grade('def 0')\n"
            f"for _i, _test in enumerate({list(record['test_list'])!r}):\n"
            f"    try:\n        exec(_test, globals())\n        _grade('test %d 1' % _i)\n"
            f"    except BaseException:\n        _grade('test %d 0' % _i)\n")


def parse_grade(stdout: str, n_tests: int) -> dict[str, float]:
    """``defines`` (0/1), ``asserts`` (share of asserts passed; unreached ones count as failed), ``passed`` (all)."""
    defines, passed = 0.0, set()
    for line in stdout.splitlines():
        parts = line.split()
        if not parts or parts[0] != GRADE_LINE:
            continue
        if parts[1:2] == ["def"]:
            defines = float(parts[2] == "1")
        elif parts[1:2] == ["test"] and parts[3] == "1":
            passed.add(int(parts[2]))
    share = len(passed) / n_tests if n_tests else 0.0
    return {"defines": defines, "asserts": share, "passed": float(n_tests > 0 and len(passed) == n_tests)}


def grade_outputs(outputs: list[str], records: list[dict], limits: SandboxLimits | None = None,
                  workers: int | None = None) -> list[dict[str, float]]:
    """Graded success of each answer (see :func:`parse_grade`), every program in the sandbox."""
    programs = [build_graded_program(extract_code(o), r) for o, r in zip(outputs, records)]
    results = run_programs(programs, limits or SandboxLimits(), workers)
    return [parse_grade(res.stdout, len(r["test_list"])) for res, r in zip(results, records)]


def load_mbpp(source: str = "mbpp-validation") -> list[Item]:
    records, _ = load_records(source)
    return [Item(id=f"mbpp-{r['task_id']}", messages=first_human_turn(r), gold=r["test_list"], record=r)
            for r in records]


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
