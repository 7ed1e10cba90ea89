"""Checks of settings shared by several stages, so each is worded and bounded in one place."""

from __future__ import annotations

import math
import numbers

from forgetless.core.errors import ConfigError


def check_fraction(x, where: str, *, include_0: bool, include_1: bool, what: str = "") -> None:
    """Refuse ``x`` (a :class:`ConfigError`) unless it is a number between 0 and 1 in the interval the caller states.

    ``include_0`` and ``include_1`` say whether each end is allowed; ``where`` names the setting and ``what`` (if
    given) says what the fraction is. None, NaN and non-numbers are refused.

    >>> check_fraction(0.0, "a masked fraction", include_0=True, include_1=False)
    >>> check_fraction(1.0, "replay_fraction", include_0=False, include_1=False)
    Traceback (most recent call last):
    ...
    forgetless.core.errors.ConfigError: replay_fraction must be in (0, 1); got 1.0
    """
    ok = (isinstance(x, numbers.Real) and not math.isnan(x)
          and (0 <= x if include_0 else 0 < x) and (x <= 1 if include_1 else x < 1))
    if not ok:
        interval = f"{'[' if include_0 else '('}0, 1{']' if include_1 else ')'}"
        raise ConfigError(f"{where} must be in {interval}{f' ({what})' if what else ''}; got {x!r}")
