"""Verdict sentences, generated from the statistics of :mod:`forgetless.core.verdicts` and
:mod:`forgetless.core.matched` and nothing else: the verdict word comes from the row's ``verdict``
(wins / loses / equivalent / not resolved), the numbers from its estimate, interval, n and p.
"""

from __future__ import annotations

import math

WORDS = {"wins": "wins against", "loses": "loses to", "equivalent": "is equivalent to",
         "not resolved": "is not resolved against"}


def interval_text(row: dict, digits: int = 3) -> str:
    """``+0.120 [+0.050, +0.190]`` (an unbounded side, from replicates that miss g*, reads ±inf)."""
    lo, hi = row["ci95"]
    return f"{row['diff']:+.{digits}f} [{_bound(lo, digits)}, {_bound(hi, digits)}]"


def _bound(x: float, digits: int) -> str:
    if math.isinf(x):
        return "-inf" if x < 0 else "+inf"
    return "nan" if math.isnan(x) else f"{x:+.{digits}f}"


def n_text(row: dict) -> str:
    return f"n = {row['n_items']} items" + (f" × {row['n_draws']} draws" if row.get("n_draws", 1) > 1 else "")


def verdict_sentence(row: dict, plain: str, family: int) -> str:
    """One line per headline row: who, the verdict, the measure, the difference, its interval, n and why."""
    ref, rival = row["reference"], row["rival"]
    word = WORDS[row["verdict"]]
    within = f" within ±{row['margin']:g}" if row["verdict"] == "equivalent" else ""
    where = f" at gain {row['gain']:g}" if "gain" in row else (f" at dose {row['dose']}" if row.get("dose") else "")
    if math.isnan(row["diff"]):  # no estimate (a curve never reaches g* on the measured models): no numbers to show
        return (f"{ref} {word} {rival}{within} on {plain}{where}: no difference to estimate, {n_text(row)}; "
                f"{row['reason']}.")
    return (f"{ref} {word} {rival}{within} on {plain}{where}: {ref} − {rival} = {interval_text(row)} (95%), "
            f"{n_text(row)}; Holm over {family} tests: {row['reason']}.")
