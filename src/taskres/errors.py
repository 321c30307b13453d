"""Errors that the user can fix: the CLI prints them and exits with status 2, without a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


class TaskResError(Exception):
    """A problem with the user's input (a path, a name, a value), with a message that says how to fix it."""


def suggest(value: str, known: Iterable[str], n: int = 3) -> str:
    """Return "did you mean 'x'? " for the closest known names, or an empty string."""
    known = list(known)
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=n, cutoff=0.5)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(lowered[c]) for c in close) + "? "
