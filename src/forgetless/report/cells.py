"""How a report table writes a number: digits, sign, percent, an optional 95% interval and item count, and the one
mark of a missing value (None or NaN)."""

from __future__ import annotations

import math
import numbers

MISSING = "—"


def is_missing(x) -> bool:
    return x is None or (isinstance(x, numbers.Real) and math.isnan(x))


def number(x, digits: int = 3, *, signed: bool = False, percent: bool = False) -> str:
    """``x`` with ``digits`` decimals (of ``100 * x`` and a ``%`` when ``percent``), ``+`` on positives when
    ``signed``.

    >>> number(0.1234), number(0.1234, 1, signed=True, percent=True), number(None)
    ('0.123', '+12.3%', '—')
    """
    if is_missing(x):
        return MISSING
    sign = "+" if signed else ""
    return f"{100 * x:{sign}.{digits}f}%" if percent else f"{x:{sign}.{digits}f}"


def interval(ci, digits: int = 3, *, signed: bool = False, percent: bool = False) -> str:
    """`` [lo, hi]`` written as :func:`number` writes, or nothing when there is no interval or an end is missing."""
    if not ci or any(is_missing(c) for c in ci):
        return ""
    lo, hi = ci
    return (f" [{number(lo, digits, signed=signed, percent=percent)}, "
            f"{number(hi, digits, signed=signed, percent=percent)}]")


def cell(x, ci=None, digits: int = 3, *, signed: bool = False, percent: bool = False, ci_digits: int | None = None,
         n: int | None = None) -> str:
    """A table cell: ``x``, its interval ``ci`` (``ci_digits`` decimals, default ``digits``) and `` n=N`` when
    ``n`` is given; :data:`MISSING` alone when ``x`` is missing.

    >>> cell(0.5, [0.25, 0.75], signed=True, ci_digits=2, n=12), cell(float("nan"), [0.1, 0.2])
    ('+0.500 [+0.25, +0.75] n=12', '—')
    """
    if is_missing(x):
        return MISSING
    text = number(x, digits, signed=signed, percent=percent)
    text += interval(ci, digits if ci_digits is None else ci_digits, signed=signed, percent=percent)
    return text + (f" n={n}" if n is not None else "")
