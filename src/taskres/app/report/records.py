"""Reading an experiment folder: one record per finished run folder under EXP/runs (and one per eval-<dataset>
folder inside it). Records are plain dicts; every table and figure of the report is computed from them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from taskres.app.experiment import (
    CONFIG,
    FAILURES,
    METRICS,
    RUNS,
    DamagedFile,
    is_integer,
    is_number,
    read_grid,
    read_metrics,
    read_run_files,
)
from taskres.errors import TaskResError

logger = logging.getLogger(__name__)

ZERO_SHOT = "zero-shot"


def readable(text: str) -> str:
    """``text`` as valid Unicode for a page or a figure: the bytes of a name read from a folder that is not UTF-8
    (Python's surrogate escapes) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def method_label(config: dict) -> str:
    """The grid's name of a run's method: TaskRes with the enhanced base is ``taskres*``."""
    method = config.get("method", "?")
    mc = config.get("method_config") or {}
    if method == "taskres" and (mc.get("enhance_base") or mc.get("base_weights")):
        return "taskres*"
    return method


def grid_options(exp: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(grid option name, config field, the methods that take it) of the experiment's --grid options, from
    EXP/sweep.json."""
    from taskres.methods.registry import option_flags

    names = list((read_grid(exp) or {}).get("grid") or {})
    flags = option_flags()
    return [(n, *flags["--" + n.replace("_", "-")]) for n in names if "--" + n.replace("_", "-") in flags]


def collect(exp: str | Path) -> list[dict]:
    """One record per finished run folder under EXP/runs (and one per eval-<dataset> folder inside it). A run folder
    whose files cannot be read back is left out with a warning naming the file."""
    options = grid_options(Path(exp))
    runs = Path(exp) / RUNS
    if not runs.is_dir():
        raise TaskResError(
            f"{str(exp)!r} is not an experiment folder (no runs/); pass a folder written by `taskres sweep`."
        )
    records = []
    for folder in run_folders(runs):
        try:
            config, metrics = read_run_files(folder)
        except DamagedFile as err:
            logger.warning("%s; run folder %s is skipped", err, folder)
            continue
        if config.get("kind") not in ("train", "zeroshot"):
            continue  # e.g. an imported official checkpoint: no shots or seed to place it in the grid
        records += _run_records(folder, config, metrics, options)
    if not records:
        raise TaskResError(f"experiment {str(exp)!r} has no finished runs yet; run `taskres sweep` first.")
    return records


def run_folders(runs: Path) -> list[Path]:
    """The folders under ``runs`` that hold a run's config.json or metrics.json, damaged or not. A folder inside a
    run (eval-<dataset>) is read with its run; a hidden one is a run being written, or left by a killed writer
    (.RUN.taskres-tmp-*)."""
    found = {p.parent for name in (CONFIG, METRICS) for p in runs.rglob(name)}
    return sorted(
        f
        for f in found
        if not any(part.startswith(".") for part in f.relative_to(runs).parts)
        and not any(parent in found for parent in f.parents)
    )


def _run_records(folder: Path, config: dict, metrics: dict, options: list) -> list[dict]:
    """The run's own record, then one per eval-<dataset> folder inside it."""
    zero = config.get("kind") == "zeroshot"
    mc = config.get("method_config") or {}
    values = tuple(
        (n, _text(mc[f]) if not zero and f in mc and config.get("method") in takers else "") for n, f, takers in options
    )
    label = ZERO_SHOT if zero else method_label(config)
    shown = ", ".join(f"{n}={v}" for n, v in values if v != "")
    base = {
        "dataset": config["dataset"]["name"],
        "backbone": config["backbone"]["spec"],
        "method": f"{label} ({shown})" if shown else label,
        "options": values,
        "shots": 0 if zero else config["shots"],
        "seed": None if zero else config["seed"],
        "protocol": config.get("protocol", "default"),
        "num_classes": config["dataset"].get("num_classes"),
        "run": str(folder),
    }
    records = [
        {
            **base,
            "eval_dataset": "",
            "accuracy": metrics["accuracy"],
            "zero_shot_accuracy": metrics.get("zero_shot_accuracy"),
            "residual_mean_abs": metrics.get("residual_mean_abs"),
            "test_selected": bool(metrics.get("test_selected", False)),
            **_details(config, metrics),
        }
    ]
    for ev in sorted(folder.glob("eval-*/metrics.json")):
        try:
            m = read_metrics(ev)
        except DamagedFile as err:
            logger.warning("%s; this evaluation is skipped", err)
            continue
        name = m.get("dataset") if isinstance(m.get("dataset"), str) else ev.parent.name[5:]
        records.append({**base, "eval_dataset": name, "accuracy": m["accuracy"]})
    return records


def _details(config: dict, metrics: dict) -> dict:
    """What the HTML page shows beyond the accuracy; None where a run from an older taskres lacks it."""
    seconds = [metrics[k] for k in ("seconds_features", "seconds_train") if isinstance(metrics.get(k), (int, float))]
    per_class = _per_class(metrics.get("per_class_accuracy"))
    return {
        "per_class": per_class,
        "confusions": _confusions(metrics.get("confusions"), len(per_class) if per_class else 0),
        "confusions_complete": bool(metrics.get("confusions_complete", False)),
        "seconds": sum(seconds) if seconds else None,
        "taskres_version": config.get("taskres_version"),
        "torch_version": config.get("torch_version"),
        "backbone_sha256": (config.get("backbone") or {}).get("sha256"),
        "method_config": config.get("method_config"),
        "optim": config.get("optim"),
        "views": config.get("views"),
    }


def imported_runs(exp: str | Path) -> list[dict]:
    """The imported official checkpoints under EXP/runs (`taskres import`): listed by the HTML page, outside the grid
    (they have no shots or seed)."""
    out = []
    for config_file in sorted((Path(exp) / RUNS).rglob(CONFIG)):
        try:
            config, metrics = read_run_files(config_file.parent)
        except DamagedFile:
            continue  # collect() warns about it, naming the file
        if config.get("kind") == "import":
            out.append(
                {
                    "dataset": config["dataset"]["name"],
                    "backbone": config["backbone"]["spec"],
                    "checkpoint": config.get("checkpoint", ""),
                    "accuracy": metrics["accuracy"],
                    "run": str(config_file.parent),
                }
            )
    return out


def failures(exp: str | Path) -> list[dict]:
    """The last failure of every cell in EXP/failures.jsonl whose run folder has no metrics.json (a cell that
    failed and then finished on a rerun is not missing)."""
    path = Path(exp) / FAILURES
    last: dict[str, dict] = {}
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed writer
        if isinstance(record, dict) and isinstance(record.get("cell"), str):
            last[record["cell"]] = record
    return [r for c, r in sorted(last.items()) if not (Path(exp) / RUNS / c / METRICS).is_file()]


def _per_class(value: Any) -> list[dict] | None:
    """metrics.json's per_class_accuracy where it has the shape taskres writes (label order, each with a class, an
    integer label and count, a number or None); else None, as for a run that lacks it."""
    if not isinstance(value, list) or not value:
        return None
    for i, row in enumerate(value):
        ok = isinstance(row, dict) and row.get("label") == i and is_integer(row.get("n")) and "class" in row
        if not ok or not (row.get("accuracy") is None or is_number(row.get("accuracy"))):
            return None
    return value


def _confusions(value: Any, classes: int) -> list | None:
    """metrics.json's confusions where each is [true, predicted, count] with labels among the ``classes``."""
    if not isinstance(value, list):
        return None
    for row in value:
        if not (isinstance(row, list) and len(row) == 3 and all(is_integer(v) for v in row)):
            return None
        if not (0 <= row[0] < classes and 0 <= row[1] < classes and row[2] >= 0):
            return None
    return value


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
