"""A digest of the code that computes a result, for cache and resume keys.

A cached score must be recomputed when the code that read or scored the answers changes (a fixed answer-reading
regex, a new grading rule). ``inspect.getsource`` of a lambda returns its own line only, so the key here is the
*files*: the named modules and every ``forgetless`` module they import at any depth (function-level imports
included, read from the source, nothing imported), within the packages named by ``within``; a package's
``__init__`` reached that way counts as a file but its own imports are not followed (it is the name lookup that
can load every task). Shared infrastructure
outside them (model loading, decoding) is keyed by its own settings, not here.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

from forgetless.lm.artifacts import file_sha256


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (None when it has none, e.g. a namespace package)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def imported_modules(path: Path) -> set[str]:
    """The ``forgetless`` modules ``path`` imports, at any depth (``from forgetless.x import y``: ``forgetless.x``
    and, when ``y`` is itself a module, ``forgetless.x.y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("forgetless"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("forgetless")}
    return found


def code_closure(modules: tuple[str, ...], within: tuple[str, ...]) -> dict[str, Path]:
    """module -> file of ``modules`` and every module they reach through imports that starts with one of
    ``within`` (the named modules themselves are always in)."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            continue
        seen[name] = path
        if path.name == "__init__.py" and name not in modules:
            continue  # a package's __init__ (shared types, the name lookup): its file counts, not all it can load
        todo += [m for m in imported_modules(path) if m.startswith(within) and m not in seen]
    return seen


@functools.lru_cache(maxsize=None)
def _file_digest(path: Path, mtime_ns: int) -> str:
    return file_sha256(path)


def code_digest(modules: tuple[str, ...], within: tuple[str, ...] = ("forgetless.eval", "forgetless.retention")) -> str:
    """sha256 (16 hex) over the names and contents of :func:`code_closure`'s files, in name order."""
    h = hashlib.sha256()
    for name, path in sorted(code_closure(tuple(modules), tuple(within)).items()):
        h.update(f"{name}\x00{_file_digest(path, path.stat().st_mtime_ns)}\x00".encode())
    return h.hexdigest()[:16]
