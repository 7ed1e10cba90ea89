"""Recompute a committed result's verdict tables from its per-item records.

    python benchmarks/rederive.py RESULT_DIR

Reads ``RESULT_DIR/items.jsonl.gz`` (one row per model, draw, measure and item) and, from
``RESULT_DIR/verdicts.json``, only the settings fixed before the run (``config``: margins, g*,
replicates, alpha, seed) and the measures; recomputes every number (the same seeded replicates)
and compares them with ``verdicts.json`` and the tables of ``verdicts.md``. Exit 0 when every
number is reproduced, 1 (with the first differences) otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from forgetless.core.verdicts import Measure, VerdictConfig
from forgetless.report.verdicts import (ITEMS_FILE, VERDICTS_FILE, VERDICTS_MD, build_verdicts, read_items,
                                        render_details, render_verdicts)


def rederive(result_dir: Path) -> list[str]:
    """The differences between the committed numbers and tables and those recomputed from the items ([]: none)."""
    committed = json.loads((result_dir / VERDICTS_FILE).read_text(encoding="utf-8"))
    measures = [Measure(**m) for m in committed["measures"]]
    data = build_verdicts(read_items(result_dir / ITEMS_FILE), measures, VerdictConfig(**committed["config"]))
    fresh = json.loads(json.dumps(data, default=float))
    problems = []
    if json.dumps(fresh, sort_keys=True) != json.dumps(committed, sort_keys=True):
        for key in ("same_dose", "matched_gain", "reference", "measures"):
            if json.dumps(fresh.get(key), sort_keys=True) != json.dumps(committed.get(key), sort_keys=True):
                problems.append(f"{VERDICTS_FILE}: {key} differs")
    md = result_dir / VERDICTS_MD
    if md.is_file():
        text = render_verdicts(data) + "\n" + render_details(data)
        old = md.read_text(encoding="utf-8")
        if text != old:
            problems += [f"{VERDICTS_MD}: {line}" for line in
                         list(difflib.unified_diff(old.splitlines(), text.splitlines(), lineterm="", n=0))[:20]]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result_dir", type=Path)
    args = parser.parse_args(argv)
    problems = rederive(args.result_dir)
    for line in problems:
        print(line)
    print(f"{args.result_dir}: " + ("every number re-derived from the items" if not problems else
                                    f"{len(problems)} differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
