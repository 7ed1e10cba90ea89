"""The eval stage's result cache and resume: cache keys, checking, reusing and storing cache entries, and the
score records a re-run keeps.

Results of a model without adapter are cached under ``$FORGETLESS_CACHE/eval``, one directory per key (model
fingerprint, task definition hash, decoding settings, item subset); a re-run after a crash keeps the tasks its
output dir already holds from identical settings. :mod:`forgetless.eval.stage` decides when each applies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from forgetless.lm import distributed
from forgetless.lm.artifacts import file_sha256, json_digest, write_dir, write_json
from forgetless.lm.decode import DecodingSettings
from forgetless.eval.tasks import Item, Task, items_fingerprint

if TYPE_CHECKING:
    from forgetless.eval.stage import EvalConfig

logger = logging.getLogger(__name__)


def _cache_parts(fingerprint: str, task: Task, items: list[Item], decoding: DecodingSettings, backend: str) -> dict:
    # vLLM's outputs (other kernels) are kept apart; without the entry, keys made before vLLM existed stay valid.
    return {"model": fingerprint, "task": task.name, "task_definition": task.definition_hash(),
            "items": items_fingerprint(items), "decoding": dataclasses.asdict(decoding),
            **({"backend": backend} if backend == "vllm" else {})}


def _cache_key(parts: dict) -> str:
    """The cache entry's name, from :func:`_cache_parts` (a list of its values: the names of entries stored before
    the parts were kept beside them)."""
    key = [parts["model"], parts["task_definition"], parts["items"], parts["decoding"]]
    key += [parts["backend"]] if "backend" in parts else []
    return json_digest(key, 24)


def _why_cache_missed(cache_root: Path, parts: dict) -> str | None:
    """Which key parts differ from the nearest cached entry of the same task (None: no entry of it)."""
    best = None
    for key_file in cache_root.glob("*/key.json") if cache_root.is_dir() else []:
        try:
            old = json.loads(key_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if old.get("task") != parts["task"]:
            continue
        changed = sorted(k for k in parts if old.get(k) != parts[k])
        if best is None or len(changed) < len(best):
            best = changed
    names = {"model": "model files (weights, config, tokenizer or chat template)",
             "items": "items (task data or subset)",
             "decoding": "decoding settings", "task_definition": "task definition", "backend": "backend (hf / vllm)"}
    return ", ".join(names.get(k, k) for k in best) if best else None


def _resume_key(settings: dict, cfg: EvalConfig) -> str:
    """What a finished ``<task>.json`` in the output dir must have been made from to be kept on a re-run."""
    from forgetless.lm.modeling import model_fingerprint

    extra = [[model_fingerprint(cfg.model, cfg.revision), model_fingerprint(cfg.adapter)] if cfg.adapter else None,
             file_sha256(cfg.predictions, 16) if cfg.predictions else None]
    return json_digest([settings, extra], 24, sort_keys=True, default=str)


def _finished(out: Path | None, name: str, resume_key: str | None) -> dict | None:
    """The score record of ``name`` already in ``out`` from identical settings (a re-run after a crash)."""
    if out is None or resume_key is None or not (out / f"{name}.items.jsonl").is_file():
        return None
    try:
        summary = json.loads((out / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("settings", {}).get("resume_key") == resume_key else None


def _check_cache_entry(cache_root: Path, cached: Path, name: str, parts: dict) -> None:
    """Say why a missing entry missed; remove an entry stored before records carried ``finish_rate``."""
    if not (cached / f"{name}.json").is_file():
        why = _why_cache_missed(cache_root, parts)
        if why:
            logger.info("%s: cached base results not used: %s changed", name, why)
    if _without_finish(cached / f"{name}.json"):
        logger.info("%s: cached results %s predate finish rates; evaluating again", name, cached)
        if distributed.is_main():
            shutil.rmtree(cached, ignore_errors=True)  # the new results are stored in its place


def _reuse_cached(cached: Path, out: Path, name: str, resume_key: str | None) -> dict:
    """The cached score record, copied with its items into ``out`` (by the first process)."""
    logger.info("%s: reusing cached results %s", name, cached)
    summary = json.loads((cached / f"{name}.json").read_text())
    summary["settings"].update(source="cache", cache_key=cached.name, resume_key=resume_key)
    if distributed.is_main():
        shutil.copyfile(cached / f"{name}.items.jsonl", out / f"{name}.items.jsonl")
        write_json(out / f"{name}.json", summary)
    return summary


def _without_finish(path: Path) -> bool:
    """A cached score record stored before records carried ``finish_rate``."""
    try:
        return path.is_file() and "finish_rate" not in json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _default_cache() -> Path:
    from forgetless.lm.modeling import cache_dir

    return cache_dir() / "eval"


def _store_cache(cached: Path, out: Path, name: str, parts: dict) -> None:
    def fill(tmp: Path) -> None:
        for suffix in (".items.jsonl", ".json"):
            shutil.copyfile(out / f"{name}{suffix}", tmp / f"{name}{suffix}")
        (tmp / "key.json").write_text(json.dumps(parts, default=str))  # lets a later miss say what changed

    write_dir(cached, fill)  # False: another run stored it first
