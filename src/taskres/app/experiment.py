"""The files of an experiment folder, read by `taskres sweep` and `taskres report` alike, and what each does with one
that is damaged (truncated, edited, emptied, not JSON, or of the wrong shape).

EXP/sweep.json       the grid; damaged: an error naming it (exit 2), nothing written
EXP/failures.jsonl   the failing cells, one JSON line each; not a file: an error naming it (exit 2), nothing run
EXP/runs/<cell>/     one run folder per cell; damaged: `sweep` moves it to EXP/damaged/<cell>-<time>/ and runs the
                     cell again, `report` leaves it out with a warning naming the file
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taskres.errors import TaskResValueError

logger = logging.getLogger(__name__)

GRID_FILE, FAILURES, RUNS, DAMAGED = "sweep.json", "failures.jsonl", "runs", "damaged"
CONFIG, METRICS = "config.json", "metrics.json"
# sweep.json's keys and the JSON type each must have (what Grid.to_json writes)
GRID_TYPES = {"datasets": list, "backbones": list, "methods": list, "shots": list, "seeds": list, "grid": dict}
GRID_TYPES.update(options=dict, optim=dict, protocol=str, eval_on=list)


class DamagedFile(TaskResValueError):
    """A file of the experiment folder that taskres cannot read back; the message names it and what is wrong."""


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; a missing, unreadable or invalid file is a DamagedFile naming it."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DamagedFile(f"{str(path)!r} is missing") from None
    except OSError as err:
        raise DamagedFile(f"{str(path)!r} cannot be read ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise DamagedFile(f"{str(path)!r} is not valid JSON ({err})") from None


def read_grid(exp: Path) -> dict | None:
    """EXP/sweep.json as written by `taskres sweep` (None: there is none); a damaged one is an error naming it."""
    path = exp / GRID_FILE
    if not path.exists():
        return None
    try:
        record = read_json(path)
        if not isinstance(record, dict):
            raise DamagedFile(f"{str(path)!r} holds a JSON {type(record).__name__}, not the grid's object")
        wrong = [k for k, kind in GRID_TYPES.items() if k in record and not isinstance(record[k], kind)]
        if wrong:
            raise DamagedFile(f"{str(path)!r} has {', '.join(wrong)} of the wrong type")
    except DamagedFile as err:
        raise DamagedFile(
            f"{err}: the experiment's grid is damaged. Restore it, or move it away and run the sweep command again "
            f"(it records the grid anew; the finished runs under {str(exp / RUNS)!r} are kept and reused).",
            param="exp",
        ) from None
    return record


def check_failures_file(exp: Path) -> None:
    """EXP/failures.jsonl must be a file that can take a line (checked before any cell runs)."""
    path = exp / FAILURES
    if path.exists() and not path.is_file():
        raise TaskResValueError(
            f"{str(path)!r} is not a file; it is where `taskres sweep` records the cells that fail. Move it away "
            "and run again.",
            param="exp",
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise TaskResValueError(f"{str(path)!r} cannot be written; fix its permissions and run again.", param="exp")


def is_number(value: Any, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_metrics(path: Path) -> dict:
    """A metrics.json whose accuracy (and optional numbers) the report can use."""
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise DamagedFile(f"{str(path)!r} holds a JSON {type(metrics).__name__}, not the metrics' object")
    if not is_number(metrics.get("accuracy")):
        raise DamagedFile(f"{str(path)!r} has no accuracy that is a number (accuracy: {metrics.get('accuracy')!r})")
    bad = [k for k in ("zero_shot_accuracy", "residual_mean_abs") if not is_number(metrics.get(k), optional=True)]
    if bad:
        raise DamagedFile(f"{str(path)!r} has {', '.join(bad)} that is not a number")
    return metrics


def read_run_files(folder: Path) -> tuple[dict, dict]:
    """(config, metrics) of a finished run folder, with the records the report and the sweep read."""
    path = folder / CONFIG
    config = read_json(path)
    if not isinstance(config, dict):
        raise DamagedFile(f"{str(path)!r} holds a JSON {type(config).__name__}, not the run's config object")
    dataset, backbone = config.get("dataset"), config.get("backbone")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("name"), str):
        raise DamagedFile(f"{str(path)!r} has no dataset record with a name")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("spec"), str):
        raise DamagedFile(f"{str(path)!r} has no backbone record with a spec")
    if config.get("kind") == "train":
        if not (
            is_integer(config.get("shots")) and is_integer(config.get("seed")) and isinstance(config.get("method"), str)
        ):
            raise DamagedFile(f"{str(path)!r} lacks the run's method, shots or seed")
        if not isinstance(config.get("method_config") or {}, dict):
            raise DamagedFile(f"{str(path)!r} has a method_config that is not an object")
    return config, read_metrics(folder / METRICS)


def run_problem(folder: Path) -> str | None:
    """What is wrong with a finished run folder (a file named), or None."""
    try:
        read_run_files(folder)
    except DamagedFile as err:
        return str(err)
    return None


def set_aside_damaged(exp: Path, cells: Sequence[str], evals: Sequence[str] = ()) -> list[Path]:
    """Move each damaged run folder of ``cells`` (and each damaged eval-<name> folder in a sound one) to
    EXP/damaged/<cell>-<time>, with a warning naming the damaged file and where it went; returns where they went.
    A missing cell is simply not finished."""
    moved = []
    for cell in cells:
        run = exp / RUNS / cell
        if not run.exists():
            continue
        problem = run_problem(run)
        parts = [(run, problem)] if problem else []
        if not problem:
            for name in evals:
                ev = run / f"eval-{name}"
                if ev.exists():
                    try:
                        read_metrics(ev / METRICS)
                    except DamagedFile as err:
                        parts.append((ev, str(err)))
        for folder, why in parts:
            target = _move_aside(exp, folder)
            logger.warning("%s; the folder is moved to %s and the cell is run again", why, target)
            moved.append(target)
    return moved


def _move_aside(exp: Path, folder: Path) -> Path:
    rel = folder.relative_to(exp / RUNS)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = exp / DAMAGED / rel.parent / f"{rel.name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{rel.name}-{stamp}-{n}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder, target)
    except OSError as err:
        raise TaskResValueError(
            f"run folder {str(folder)!r} is damaged and cannot be moved to {str(target)!r} ({err.strerror or err}); "
            "move it away yourself and run again.",
            param="exp",
        ) from None
    return target
