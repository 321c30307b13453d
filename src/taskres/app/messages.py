"""Library errors as the command line shows them: each parameter named as the flag that sets it, the names read
from the parser itself (a positional by its metavar: ``exp`` -> EXP)."""

from __future__ import annotations

import argparse
import re

from taskres.app.options import method_options
from taskres.errors import TaskResError

# Library parameters named otherwise on the command line: parameter -> the dest of its flag.
LIBRARY_NAMES = {"templates": "template"}


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return _commands(parser)[command]


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> what the user typed: the first long flag (``--run`` of ``--run``/``--run-dir``), or a positional's
    metavar (``exp`` -> ``EXP``)."""
    names = {}
    for action in parser._actions:
        if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction)):
            continue
        if not action.option_strings:
            names[action.dest] = str(action.metavar or action.dest.upper())
        else:
            names[action.dest] = next(
                (s for s in action.option_strings if s.startswith("--")), action.option_strings[0]
            )
    return names


def message_names(parser: argparse.ArgumentParser, command: str, method: str | None = None) -> dict[str, str]:
    """Library parameter -> flag for ``command``'s messages: its own flags over those of the other commands, the
    method options by their field names (``method``'s own first: tip-adapter's ``alpha`` is ``--tip-alpha``)."""
    names: dict[str, str] = {}
    for name in _commands(parser):
        names.update(flag_names(subparser(parser, name)))
    names.update(flag_names(subparser(parser, command)))
    names.update({param: names[dest] for param, dest in LIBRARY_NAMES.items() if dest in names})
    options = method_options().values()
    for option in options:
        names.setdefault(option.field, option.flag)
    names.update({o.field: o.flag for o in options if method in o.methods})
    return names


def describe(err: TaskResError, names: dict[str, str]) -> str:
    """The library's message with parameters named as the flags the user typed: the leading parameter of
    ``alpha must ...`` and every `name` in backquotes (``set `search` none`` -> ``set --search none``)."""
    text = str(err)
    param = err.param
    if param in names and text.startswith(param + " "):
        text = names[param] + text[len(param) :]
    return re.sub(r"`(\w+)`", lambda m: names.get(m.group(1), m.group(1)), text)
