"""Imports point down, function-level imports included: core <- lm <- stages <- grid <- run <- cli.

A stage never imports the orchestrator (``run``, ``grid``) or the CLI; ``lm`` and ``core`` never import a stage;
``core`` imports nothing of forgetless outside itself; and no two packages import each other, directly or around
a longer loop (an import placed inside a function to dodge a cycle is still an edge here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import forgetless

ROOT = Path(forgetless.__file__).parent
STAGES = ("score", "mask", "generate", "train", "eval", "retention", "report", "replay")
LAYER = {"core": 0, "lm": 1, "config": 1, **{s: 2 for s in STAGES}, "grid": 3, "api": 3, "target": 3, "verdict": 3,
         "run": 4, "runplan": 4, "runreport": 4, "cli": 5, "__main__": 6}


def unit(module: str) -> str:
    """The layer unit of a dotted module name: its first component under forgetless (``forgetless`` for the root)."""
    parts = [p for p in module.split(".") if p != "__init__"]
    return parts[1] if len(parts) > 1 else "forgetless"


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported forgetless module, line) of every import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.startswith("forgetless")):
            names = [f"forgetless.{a.name}" for a in node.names] if node.module == "forgetless" else [node.module]
            found += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute module")
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("forgetless")]
    return found


def edges() -> dict[tuple[str, str], str]:
    """(from unit, to unit) -> where the first such import is."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        source = unit(".".join(("forgetless", *path.relative_to(ROOT).with_suffix("").parts)))
        for module, line in imports(path):
            target = unit(module)
            if target == "__version__":  # `from forgetless import __version__`: the package root's metadata
                target = "forgetless"
            if target != source and source != "forgetless":  # the root's lazy exports point into the packages
                out.setdefault((source, target), f"{path.relative_to(ROOT.parent)}:{line} imports {module}")
    return out


def test_every_unit_has_a_layer():
    units = {unit(".".join(("forgetless", *p.relative_to(ROOT).with_suffix("").parts))) for p in ROOT.rglob("*.py")}
    assert units - {"forgetless"} <= set(LAYER), units - set(LAYER)


def test_imports_point_down():
    upward = [where for (a, b), where in edges().items()
              if b != "forgetless" and (LAYER[b] > LAYER[a] or (LAYER[a] < 2 and LAYER[b] == LAYER[a] and a != b
                                                                and {a, b} != {"lm", "config"}))]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_core_imports_only_core():
    assert not [w for (a, b), w in edges().items() if a == "core" and b != "core"]


def test_no_two_packages_import_each_other():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return False

    cycles = sorted(f"{a} -> {b} ({w}) and back" for (a, b), w in edges().items() if b in graph and reaches(b, a))
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("text, expected",
                         [("from forgetless.run import x", "run"), ("import forgetless.lm.data", "lm")])
def test_the_walker_sees_imports_inside_functions(tmp_path, text, expected):
    path = tmp_path / "m.py"
    path.write_text(f"def f():\n    {text}\n")
    assert [unit(m) for m, _ in imports(path)] == [expected]
