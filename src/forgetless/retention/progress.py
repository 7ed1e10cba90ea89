"""What a retention stage has measured so far, so that a re-run after a crash keeps it.

``.progress.json`` in the stage's output folder holds the stage's key (its settings, the measure code, the model's
and adapter's fingerprints) and, per finished measure (``behaviour:gsm8k``, ``mc:piqa``, ...), the names of the
records it wrote there. A re-run with the same key reads those records back instead of measuring again; any other
key starts from nothing. Records are written before the measure is entered here, so an entry always has its files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from forgetless.lm import artifacts, distributed
from forgetless.retention.records import read_task

logger = logging.getLogger(__name__)

PROGRESS_FILE = ".progress.json"


class Progress:
    """The finished measures of one retention stage (module docstring). Every process reads the file when the
    stage starts; only the first writes it."""

    def __init__(self, out_dir: str | Path, key: str):
        self.out, self.key = Path(out_dir), key
        path = self.out / PROGRESS_FILE
        old = artifacts.read_json(path) if path.is_file() else {}
        self.done: dict[str, list[str]] = dict(old.get("done", {})) if old.get("key") == key else {}
        distributed.barrier()  # every process has read it before the first writes

    def finished(self, measure: str) -> dict[str, dict[str, Any]] | None:
        """The records of ``measure`` when an earlier run of this stage finished it, else None."""
        names = self.done.get(measure)
        if names is None:
            return None
        try:
            records = {name: read_task(self.out, name)[0] for name in names}
        except (OSError, ValueError):  # a record removed or cut since: measure again
            return None
        logger.info("retention: %s measured already (%s)", measure, self.out)
        return records

    def add(self, measure: str, records: dict[str, dict[str, Any]]) -> None:
        """Note that ``measure`` wrote ``records``."""
        self.done[measure] = sorted(records)
        if distributed.is_main():
            artifacts.write_json(self.out / PROGRESS_FILE, {"key": self.key, "done": self.done})
