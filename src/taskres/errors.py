"""Errors that the user can fix. The library names the parameter at fault (a message starts with it, or writes it
in backquotes: "set `search` none"); the CLI prints the message with each parameter mapped to its flag and exits
with status 2, without a traceback.

Each error is also the built-in a Python user expects: a bad value is a ``ValueError``, a missing file a
``FileNotFoundError``, so ``except ValueError`` works around library calls.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TaskResError(Exception):
    """A problem with the user's input (a path, a name, a value), with a message that says how to fix it.

    ``param`` names the library parameter at fault (``"alpha"``, ``"shots"``), when there is one: the CLI maps it to
    its flag.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TaskResValueError(TaskResError, ValueError):
    """A value out of its range, an unknown name, an inconsistent combination of settings."""


class TaskResFileNotFoundError(TaskResError, FileNotFoundError):
    """A file or folder that the user named (or that a dataset lists) does not exist."""


def invalid(param: str, rule: str, value: object, fix: str = "") -> TaskResValueError:
    """``param must RULE; got VALUE.[ FIX]``: the library's message for a bad parameter value."""
    return TaskResValueError(f"{param} must {rule}; got {value!r}.{' ' + fix if fix else ''}", param=param)


def check_choice(param: str, value: object, choices: Iterable[str]) -> None:
    """Raise a TaskResValueError naming ``param`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise invalid(param, f"be one of {', '.join(choices)}", value)


def suggest(value: str, known: Iterable[str], n: int = 3) -> str:
    """Return "did you mean 'x'? " for the closest known names, or an empty string."""
    known = list(known)
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=n, cutoff=0.5)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(lowered[c]) for c in close) + "? "
