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


def stamped(settings: dict) -> dict:
    """What a stamp holds: the settings and the forgetless version (a new version re-runs the stage)."""
    return {**settings, "forgetless_version": __version__}


def stage_done(out: Path, settings: dict) -> bool:
    """True when ``out`` holds a finished stage made with ``settings`` by this forgetless version (compared as JSON:
    tuples read back as lists)."""
    settings = stamped(settings)
    stamp = out / STAMP
    if not stamp.is_file():
        return False
    changed = artifacts.stale_fields(artifacts.read_json(stamp), settings)
    if changed:
        logger.info("%s: re-running, %s changed", out, ", ".join(changed))
    return not changed


def run_once(out: Path, settings: dict, fn: Callable[[], Any], what: str) -> Path:
    """Run ``fn`` unless ``out`` already holds its result for the same ``settings``; log its time and the
    process's peak RSS so far."""
    if stage_done(out, settings):
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
