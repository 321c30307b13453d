"""Run folders: what was done, what was learned, what it scored.

RUN/config.json           everything resolved (backbone identity, dataset source, split hash, method, optimiser)
RUN/fewshot_split.json    {"train": [...], "val": [...]} entries actually used
RUN/classifier.safetensors the head's tensors; method, config, class names, alpha, logit scale in the metadata
RUN/log.jsonl             one JSON line per epoch
RUN/metrics.json          written last: a run without it is incomplete
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from taskres.errors import TaskResError
from taskres.methods import get_method

CONFIG, SPLIT, CLASSIFIER, LOG, METRICS = (
    "config.json", "fewshot_split.json", "classifier.safetensors", "log.jsonl", "metrics.json")
PROJECTION = "text_projection.safetensors"  # TaskRes* with --enhance-base


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def prepare_run_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Create the run folder; a finished run (one with metrics.json) is only replaced with ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TaskResError(f"--out {str(out)!r} exists and is not a folder; choose another path.")
    if (out / METRICS).exists() and not overwrite:
        raise TaskResError(f"run folder {str(out)!r} already holds a finished run (metrics.json); choose another "
                           "--out, or pass --overwrite to replace it.")
    out.mkdir(parents=True, exist_ok=True)
    # An unfinished or replaced run starts afresh: the completion marker first, then what it described.
    for name in (METRICS, LOG, CONFIG, SPLIT, CLASSIFIER, PROJECTION):
        (out / name).unlink(missing_ok=True)
    return out


def save_classifier(path: Path, method: str, head: torch.nn.Module, classnames: list[str],
                    class_ids: list[str] | None = None) -> None:
    tensors, meta = head.export()
    metadata = {"method": method, "config": json.dumps(meta), "classnames": json.dumps(list(classnames)),
                "class_ids": json.dumps(list(class_ids or [])), "format": "taskres-classifier-1"}
    metadata.update({k: str(v) for k, v in meta.items() if isinstance(v, (int, float, str, bool))})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_classifier(path: Path) -> tuple[torch.nn.Module, list[str], list[str]]:
    """(head, class names, class ids or []) from a classifier.safetensors file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TaskResError(f"classifier file {str(path)!r} cannot be read ({err}); re-run training.") from None
    if "method" not in meta:
        raise TaskResError(f"classifier file {str(path)!r} has no taskres metadata; it was not written by taskres.")
    head = get_method(meta["method"]).load(tensors, json.loads(meta["config"]))
    return head, json.loads(meta["classnames"]), json.loads(meta.get("class_ids", "[]"))


def read_run(run: str | Path) -> tuple[Path, dict]:
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise TaskResError(f"{str(run)!r} is not a run folder (no config.json); pass --run a folder written by "
                           "`taskres train` or `taskres zeroshot`.")
    if not (run / METRICS).is_file():
        raise TaskResError(f"run {str(run)!r} is incomplete (no metrics.json): it was interrupted or failed. "
                           "Re-run the same train command to finish it.")
    return run, json.loads((run / CONFIG).read_text())


class EpochLog:
    """Appends one JSON line per epoch to RUN/log.jsonl, flushed as it goes."""

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
