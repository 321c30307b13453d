"""Run folders: what was done, what was learned, what it scored. ``RunWriter`` owns a folder's files.

RUN/config.json            everything resolved (backbone identity, dataset source, split hash, method, optimiser)
RUN/fewshot_split.json     {"train": [...], "val": [...]} entries actually used
RUN/classifier.safetensors the head's tensors; method, config, class names, alpha, logit scale in the metadata
RUN/log.jsonl              one JSON line per epoch
RUN/metrics.json           written last: a run without it is incomplete
(and the files a method adds, such as TaskRes*'s text_projection.safetensors)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from taskres.atomic import atomic_path, write_json
from taskres.errors import TaskResFileNotFoundError, TaskResValueError

CONFIG, SPLIT, CLASSIFIER, LOG, METRICS = (
    "config.json", "fewshot_split.json", "classifier.safetensors", "log.jsonl", "metrics.json")
CLASSIFIER_FORMAT = "taskres-classifier-1"


def save_classifier(path: Path, method: str, head: torch.nn.Module, classnames: Sequence[str],
                    class_ids: Sequence[str] | None = None) -> None:
    """The head's export as safetensors: its tensors, and in the metadata the method, the head's config (JSON),
    the class names and ids, and the config's scalar values (readable without JSON)."""
    tensors, meta = head.export()
    metadata = {"method": method, "config": json.dumps(meta), "classnames": json.dumps(list(classnames)),
                "class_ids": json.dumps(list(class_ids or [])), "format": CLASSIFIER_FORMAT}
    metadata.update({k: str(v) for k, v in meta.items() if isinstance(v, (int, float, str, bool))})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_classifier(path: Path) -> tuple[str, dict[str, torch.Tensor], dict, list[str], list[str]]:
    """(method name, tensors, head metadata, class names, class ids or []) of a classifier.safetensors file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TaskResValueError(f"classifier file {str(path)!r} cannot be read ({err}); re-run training.") from None
    if "method" not in meta:
        raise TaskResValueError(f"classifier file {str(path)!r} has no taskres metadata; it was not written by "
                                "taskres.")
    return (meta["method"], tensors, json.loads(meta["config"]), json.loads(meta["classnames"]),
            json.loads(meta.get("class_ids", "[]")))


def read_run(run: str | Path) -> tuple[Path, dict]:
    """(folder, config) of a finished run."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise TaskResFileNotFoundError(f"{str(run)!r} is not a run folder (no config.json); pass --run a folder "
                                       "written by `taskres train` or `taskres zeroshot`.", param="run")
    if not (run / METRICS).is_file():
        raise TaskResValueError(f"run {str(run)!r} is incomplete (no metrics.json): it was interrupted or failed. "
                                "Re-run the same train command to finish it.", param="run")
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


class RunWriter:
    """The files of one run folder, written in order: split, log, then config, classifier and other files, and
    metrics.json last (a folder without it is an unfinished run).

    ``RunWriter.create(out, overwrite, extra_files)`` refuses a finished run unless ``overwrite``, and clears what an
    unfinished or replaced run left (``extra_files``: the names of files methods may add).
    """

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def create(cls, out: str | Path, overwrite: bool = False, extra_files: Iterable[str] = ()) -> "RunWriter":
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise TaskResValueError(f"out {str(out)!r} exists and is not a folder; choose another path.", param="out")
        if (out / METRICS).exists() and not overwrite:
            raise TaskResValueError(f"run folder {str(out)!r} already holds a finished run (metrics.json); choose "
                                    "another --out, or pass --overwrite to replace it.", param="out")
        out.mkdir(parents=True, exist_ok=True)
        # An unfinished or replaced run starts afresh: the completion marker first, then what it described.
        for name in (METRICS, LOG, CONFIG, SPLIT, CLASSIFIER, *extra_files):
            (out / name).unlink(missing_ok=True)
        return cls(out)

    def write_split(self, fewshot: dict[str, Sequence]) -> None:
        write_json(self.folder / SPLIT, {k: [e.to_json() for e in v] for k, v in fewshot.items()})

    def epoch_log(self) -> EpochLog:
        return EpochLog(self.folder / LOG)

    def write_file(self, name: str, write: Callable[[Path], None]) -> Path:
        """A method's own file, written atomically by ``write(path)``; returns its final path."""
        path = self.folder / name
        with atomic_path(path) as tmp:
            write(tmp)
        return path

    def finish(self, config: dict[str, Any], head: torch.nn.Module, method: str, classnames: Sequence[str],
               class_ids: Sequence[str], metrics: dict[str, Any]) -> None:
        write_json(self.folder / CONFIG, config)
        save_classifier(self.folder / CLASSIFIER, method, head, classnames, class_ids)
        write_json(self.folder / METRICS, metrics)
