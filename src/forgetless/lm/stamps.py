"""A stage of ``forgetless run`` runs once per settings: when it finishes, its output folder gets a stamp of the
settings it ran with (``.run_stamp.json``, written last), and a later run with the same settings skips it, so an
interrupted grid resumes where it stopped. Under a launcher every process runs the stage, the first writes the
stamp, and all wait for it."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any, Callable

from forgetless import __version__
from forgetless.lm import artifacts, distributed

logger = logging.getLogger(__name__)

STAMP = ".run_stamp.json"
STARTED = ".run_started.json"  # the settings of the run in progress (written first): may its partial output be used?


def stamped(settings: dict) -> dict:
    """What a stamp holds: the settings and the forgetless version (a new version re-runs the stage)."""
    return {**settings, "forgetless_version": __version__}


def _changed(path: Path, settings: dict, ignore: tuple[str, ...]) -> list[str] | None:
    """The fields of ``settings`` (stamped) that differ from those in ``path``, less ``ignore``; None without it."""
    if not path.is_file():
        return None
    old, new = artifacts.read_json(path), stamped(settings)
    return [k for k in artifacts.stale_fields(old, new) if k not in ignore]


def stage_done(out: Path, settings: dict, ignore: tuple[str, ...] = ()) -> bool:
    """True when ``out`` holds a finished stage made with ``settings`` by this forgetless version (compared as JSON:
    tuples read back as lists; the fields named in ``ignore`` are not compared)."""
    changed = _changed(out / STAMP, settings, ignore)
    if changed:
        logger.info("%s: re-running, %s changed", out, ", ".join(changed))
    return changed == []


def started_with(out: Path, settings: dict, ignore: tuple[str, ...] = ()) -> bool:
    """True when the unfinished stage in ``out`` was started with ``settings`` (less ``ignore``) by this version,
    so what it left (a checkpoint) can be continued."""
    return _changed(out / STARTED, settings, ignore) == []


def record_start(out: Path, settings: dict) -> None:
    """Note that a stage which can continue an interrupted run of itself starts in ``out`` with ``settings``."""
    artifacts.write_json(out / STARTED, stamped(settings))


def run_once(out: Path, settings: dict, fn: Callable[[], Any], what: str, ignore: tuple[str, ...] = ()) -> Path:
    """Run ``fn`` unless ``out`` already holds its result for the same ``settings`` (less ``ignore``); log its time
    and the process's peak RSS so far."""
    if stage_done(out, settings, ignore):
        logger.info("%s: done already (%s)", what, out)
        return out
    logger.info("%s -> %s", what, out)
    start = time.perf_counter()
    fn()
    logger.info("%s: done in %.0f s (this process's peak RSS so far: %.1f GiB)", what, time.perf_counter() - start,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # ru_maxrss: KiB on Linux
    if distributed.is_main():
        artifacts.write_json(out / STAMP, stamped(settings))
    distributed.barrier()
    return out
