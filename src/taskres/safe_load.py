"""Reading torch checkpoints that pickle more than tensors, without executing anything the file names.

Dassl-trained checkpoints (the official TaskRes ``strong_base`` files among them) pickle the optimiser and the
learning-rate scheduler next to the weights, which ``torch.load(weights_only=True)`` refuses. Here:

1. the pickle's globals are listed by torch's scanner, which parses opcodes and executes nothing;
2. any global that is neither in torch's weights-only allowlist nor an optimiser or scheduler class (``INERT``) is
   refused, naming it: ``os.system``, ``builtins.eval`` and the like never get further than this;
3. the optimiser and scheduler classes are mapped to ``Inert``, a stand-in that only stores the state it is given,
   and the file is read by torch's weights-only unpickler.

Nothing from the file is imported or called, and there is no fallback to unrestricted unpickling.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from taskres.errors import TaskResFileNotFoundError, TaskResValueError

# Module prefixes whose classes appear in Dassl checkpoints as optimiser and scheduler objects. They become Inert.
INERT = ("torch.optim.", "dassl.")


def _plain_dict(*args: Any) -> dict:
    """``defaultdict(factory)`` read back as a plain dict (the weights-only unpickler fills only dicts)."""
    return {}


# Containers that the optimiser's state uses (``defaultdict(dict)``), built as plain dicts.
CONTAINERS = {"collections.defaultdict": _plain_dict, "builtins.dict": dict}


class Inert:
    """Stands in for a class named by a checkpoint: accepts any arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """The object pickled in a torch checkpoint, tensors on the CPU; optimiser/scheduler objects come back Inert.

    A file that cannot be read this way is a TaskResError naming it (and the refused global, if any).
    """
    path = Path(path)
    if not path.is_file():
        raise TaskResFileNotFoundError(f"{what} {str(path)!r} does not exist.")
    extra: list = []
    if zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # torch raises RuntimeError, ValueError or pickle errors for damaged archives
            raise TaskResValueError(
                f"{what} {str(path)!r} cannot be read safely ({type(err).__name__}: {_first_line(err)})."
            ) from None
        refused = [n for n in names if n not in CONTAINERS and not n.startswith(INERT)]
        if refused:
            raise TaskResValueError(
                f"{what} {str(path)!r} is refused: its pickle calls "
                f"{', '.join(map(repr, refused))}, "
                "which could run code. Only tensors, containers and optimiser/scheduler state are "
                "read; re-save the weights with safetensors or as a plain dict of tensors."
            )
        extra = [(CONTAINERS[n], n) if n in CONTAINERS else (type(n, (Inert,), {}), n) for n in names]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # the weights-only unpickler raises UnpicklingError, RuntimeError or EOFError
        raise TaskResValueError(
            f"{what} {str(path)!r} cannot be read safely ({type(err).__name__}: {_first_line(err)})."
        ) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that builds only the classes it is given (by their dotted name) and refuses every other global:
    no module is imported and nothing the file names is called."""

    def __init__(self, file, allowed: dict[str, type]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        dotted = f"{module}.{name}"
        if dotted in self.allowed:
            return self.allowed[dotted]
        raise pickle.UnpicklingError(f"refused global {dotted!r}")


def load_plain_pickle(path: str | Path, allowed: dict[str, type], what: str = "file") -> Any:
    """A plain pickle (not a torch archive) read with only ``allowed`` classes, each mapped to a stand-in record
    class of ours; any other global (``os.system``, ``builtins.eval``) is refused, naming it."""
    path = Path(path)
    if not path.is_file():
        raise TaskResFileNotFoundError(f"{what} {str(path)!r} does not exist.")
    try:
        with open(path, "rb") as f:
            return _AllowListUnpickler(f, allowed).load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("refused global"):
            raise TaskResValueError(
                f"{what} {str(path)!r} is refused: its pickle asks for {str(err)[15:]}, which "
                "could run code; only plain data and the records listed in the docs are "
                "read."
            ) from None
        raise TaskResValueError(f"{what} {str(path)!r} cannot be read ({_first_line(err)}).") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as err:
        raise TaskResValueError(
            f"{what} {str(path)!r} cannot be read as a pickle ({type(err).__name__}: {_first_line(err)})."
        ) from None
