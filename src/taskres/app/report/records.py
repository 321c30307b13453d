"""Reading an experiment folder: one record per finished run folder under EXP/runs (and one per eval-<dataset>
folder inside it). Records are plain dicts; every table and figure of the report is computed from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from taskres.errors import TaskResError

ZERO_SHOT = "zero-shot"


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

    path = exp / "sweep.json"
    names = list(json.loads(path.read_text()).get("grid") or {}) if path.is_file() else []
    flags = option_flags()
    return [(n, *flags["--" + n.replace("_", "-")]) for n in names if "--" + n.replace("_", "-") in flags]


def collect(exp: str | Path) -> list[dict]:
    """One record per finished run folder under EXP/runs (and one per eval-<dataset> folder inside it)."""
    options = grid_options(Path(exp))
    runs = Path(exp) / "runs"
    if not runs.is_dir():
        raise TaskResError(
            f"{str(exp)!r} is not an experiment folder (no runs/); pass a folder written by `taskres sweep`."
        )
    records = []
    for metrics_file in sorted(runs.rglob("metrics.json")):
        folder = metrics_file.parent
        config_file = folder / "config.json"
        if any(part.startswith(".") for part in folder.relative_to(runs).parts):
            continue  # a run being written, or left by a killed writer (.RUN.taskres-tmp-*)
        if not config_file.is_file():
            continue  # an eval-<dataset> folder: read with its run
        config = json.loads(config_file.read_text())
        if config.get("kind") not in ("train", "zeroshot"):
            continue  # e.g. an imported official checkpoint: no shots or seed to place it in the grid
        records += _run_records(folder, config, json.loads(metrics_file.read_text()), options)
    if not records:
        raise TaskResError(f"experiment {str(exp)!r} has no finished runs yet; run `taskres sweep` first.")
    return records


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
        m = json.loads(ev.read_text())
        records.append({**base, "eval_dataset": m.get("dataset", ev.parent.name[5:]), "accuracy": m["accuracy"]})
    return records


def _details(config: dict, metrics: dict) -> dict:
    """What the HTML page shows beyond the accuracy; None where a run from an older taskres lacks it."""
    seconds = [metrics[k] for k in ("seconds_features", "seconds_train") if isinstance(metrics.get(k), (int, float))]
    return {
        "per_class": metrics.get("per_class_accuracy"),
        "confusions": metrics.get("confusions"),
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
    for config_file in sorted((Path(exp) / "runs").rglob("config.json")):
        metrics_file = config_file.parent / "metrics.json"
        config = json.loads(config_file.read_text())
        if config.get("kind") == "import" and metrics_file.is_file():
            out.append(
                {
                    "dataset": config["dataset"]["name"],
                    "backbone": config["backbone"]["spec"],
                    "checkpoint": config.get("checkpoint", ""),
                    "accuracy": json.loads(metrics_file.read_text())["accuracy"],
                    "run": str(config_file.parent),
                }
            )
    return out


def failures(exp: str | Path) -> list[dict]:
    """The last failure of every cell in EXP/failures.jsonl whose run folder has no metrics.json (a cell that
    failed and then finished on a rerun is not missing)."""
    path = Path(exp) / "failures.jsonl"
    last: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed writer
        if isinstance(record, dict) and isinstance(record.get("cell"), str):
            last[record["cell"]] = record
    return [r for c, r in sorted(last.items()) if not (Path(exp) / "runs" / c / "metrics.json").is_file()]


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
