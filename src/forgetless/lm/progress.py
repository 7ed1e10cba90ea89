"""Progress bars for loops that can take more than a few seconds."""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total_items: int,
             count: Callable[[T], int] = lambda _: 1) -> Iterator[T]:
    """Yield ``items`` while a bar counts ``count(item)`` units each, showing units/s.

    Off with ``FORGETLESS_PROGRESS=0``; into a log (stderr not a terminal) one update a minute at most, so a
    background run's log says how far it is without filling up.
    """
    with counter(description, total_items) as bar:
        for item in items:
            yield item
            bar.update(count(item))


def counter(description: str, total_items: int, unit: str = "ex", enabled: bool = True) -> tqdm:
    """A bar the caller advances with ``update(n)`` (for work that finishes out of order); close it after use."""
    disable = not enabled or os.environ.get("FORGETLESS_PROGRESS") == "0"
    terminal = sys.stderr.isatty()
    return tqdm(total=total_items, desc=description, unit=unit, disable=disable, dynamic_ncols=terminal,
                mininterval=0.1 if terminal else LOG_INTERVAL_S, ascii=not terminal)


LOG_INTERVAL_S = 60  # seconds between two progress updates written to a log file
