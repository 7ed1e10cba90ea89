"""Progress bars: on a terminal as usual; into a log (a background run) one update a minute at most; off with
FORGETLESS_PROGRESS=0."""

from __future__ import annotations

import io
import sys

from forgetless.lm import progress


def test_a_log_gets_a_line_a_minute_and_zero_turns_it_off(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setenv("FORGETLESS_PROGRESS", "1")
    bar = progress.counter("generating", 10)
    assert not bar.disable and bar.mininterval == progress.LOG_INTERVAL_S == 60
    bar.update(10)
    bar.close()
    assert "generating" in log.getvalue() and "10/10" in log.getvalue()
    monkeypatch.setenv("FORGETLESS_PROGRESS", "0")
    assert progress.counter("generating", 10).disable
    monkeypatch.setenv("FORGETLESS_PROGRESS", "1")
    assert progress.counter("generating", 10, enabled=False).disable
