"""The errors forgetless raises for what a user can fix, under one base.

The CLI shows a :class:`ForgetlessError` as one line (the message names the setting, file or example to fix);
anything else (an out-of-memory error, a bug) keeps its traceback, with a line on how to report it. Each error
also derives from the built-in kind it always was (``ValueError`` for bad settings and data), so code that caught
those still does.
"""

from __future__ import annotations


class ForgetlessError(Exception):
    """Base of every error the user can fix from its message alone."""


class ConfigError(ForgetlessError, ValueError):
    """A setting, a config file or an override cannot be applied."""


class DataError(ForgetlessError, ValueError):
    """A data set, task file or stage output cannot be used as given; the message names the file and the item."""
