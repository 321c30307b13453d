"""Run folders: what was done, what was learned, what it scored. ``RunWriter`` owns a folder's files.

RUN/config.json            everything resolved (backbone identity, dataset source, split hash, method, optimiser)
RUN/fewshot_split.json     {"train": [...], "val": [...]} entries actually used
RUN/classifier.safetensors the head's tensors; method, config, class names, alpha, logit scale and a SHA-256 of the
                           tensors and metadata in the metadata (checked when read)
RUN/log.jsonl              one JSON line per epoch
RUN/metrics.json           the scores
(and the files a method adds, such as TaskRes*'s text_projection.safetensors)

This module holds the files' names and formats, and reads finished runs; ``taskres.run_writer`` writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from safetensors import SafetensorError, safe_open

import taskres
from taskres.atomic import write_safetensors
from taskres.errors import TaskResFileNotFoundError, TaskResValueError

if TYPE_CHECKING:
    from taskres.backbones import Backbone
    from taskres.config import Setup
    from taskres.data.splits import DatasetSplits

logger = logging.getLogger(__name__)

CONFIG, SPLIT, CLASSIFIER, LOG, METRICS = (
    "config.json",
    "fewshot_split.json",
    "classifier.safetensors",
    "log.jsonl",
    "metrics.json",
)
RUN_FILES = (CONFIG, SPLIT, CLASSIFIER, LOG, METRICS)
CLASSIFIER_FORMAT = "taskres-classifier-1"
DIGEST_KEY = "sha256"  # classifier metadata: SHA-256 of the tensors and the rest of the metadata


def classifier_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata (without its digest) and every tensor's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != DIGEST_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ExportableHead(Protocol):
    """What a run needs of a method's head (``taskres.methods.base.Head``, which this module does not import)."""

    def export(self) -> tuple[dict[str, torch.Tensor], dict]: ...


def save_classifier(
    path: Path, method: str, head: ExportableHead, classnames: Sequence[str], class_ids: Sequence[str] | None = None
) -> None:
    """The head's export as safetensors: its tensors, and in the metadata the method, the head's config (JSON),
    the class names and ids, the config's scalar values (readable without JSON) and the digest. The bytes depend
    only on the head: identical runs give identical files."""
    tensors, meta = head.export()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "method": method,
        "config": json.dumps(meta),
        "classnames": json.dumps(list(classnames)),
        "class_ids": json.dumps(list(class_ids or [])),
        "format": CLASSIFIER_FORMAT,
    }
    metadata.update({k: str(v) for k, v in meta.items() if isinstance(v, (int, float, str, bool))})
    metadata[DIGEST_KEY] = classifier_digest(tensors, metadata)
    write_safetensors(path, tensors, metadata)


def read_classifier(path: Path) -> tuple[str, dict[str, torch.Tensor], dict, list[str], list[str]]:
    """(method name, tensors, head metadata, class names, class ids or []) of a classifier.safetensors file, whose
    digest must match (a file without one, from an older taskres, is read with a warning)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TaskResValueError(
            f"classifier file {str(path)!r} cannot be read ({err}); re-run training.", param="run"
        ) from None
    if "method" not in meta:
        raise TaskResValueError(
            f"classifier file {str(path)!r} has no taskres metadata; it was not written by taskres.", param="run"
        )
    if DIGEST_KEY not in meta:
        logger.warning("classifier file %s carries no checksum (written by an older taskres); it is not verified", path)
    elif classifier_digest(tensors, meta) != meta[DIGEST_KEY]:
        raise TaskResValueError(
            f"classifier file {str(path)!r} does not match its checksum: its tensors or "
            "metadata changed after taskres wrote it (a damaged or edited file). Re-run "
            "training, or restore the file from a copy.",
            param="run",
        )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TaskResValueError(
            f"classifier file {str(path)!r} holds non-finite values in {bad}; re-run training.", param="run"
        )
    try:
        parsed = (json.loads(meta["config"]), json.loads(meta["classnames"]), json.loads(meta.get("class_ids", "[]")))
    except (KeyError, json.JSONDecodeError) as err:
        raise TaskResValueError(
            f"classifier file {str(path)!r} has damaged metadata ({type(err).__name__}: {err}); re-run training.",
            param="run",
        ) from None
    head_meta, classnames, class_ids = parsed
    if not (isinstance(head_meta, dict) and isinstance(classnames, list) and isinstance(class_ids, list)):
        raise TaskResValueError(f"classifier file {str(path)!r} has damaged metadata; re-run training.", param="run")
    return meta["method"], tensors, head_meta, classnames, class_ids


def read_run(run: str | Path) -> tuple[Path, dict]:
    """(folder, config) of a finished run."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        raise TaskResFileNotFoundError(
            f"{str(run)!r} is not a run folder (no config.json); pass --run a folder "
            "written by `taskres train` or `taskres zeroshot`.",
            param="run",
        )
    if not (run / METRICS).is_file():
        raise TaskResValueError(
            f"run {str(run)!r} is incomplete (no metrics.json): it was interrupted or failed. "
            "Re-run the same train command to finish it.",
            param="run",
        )
    try:
        config = json.loads((run / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskResValueError(
            f"run {str(run)!r}: config.json cannot be read ({type(err).__name__}: {err}); "
            "it was edited or damaged. Re-run training.",
            param="run",
        ) from None
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("backbone"), dict)
        or not isinstance(config.get("dataset"), dict)
    ):
        raise TaskResValueError(
            f"run {str(run)!r}: config.json lacks the backbone and dataset records that taskres "
            "writes; it was edited or damaged. Re-run training.",
            param="run",
        )
    return run, config


def run_record(kind: str, backbone: Backbone, dataset: DatasetSplits, setup: Setup, **extra) -> dict:
    """config.json: versions, backbone identity, dataset source and split hash, setup, and ``extra``."""
    return {
        "kind": kind,
        "taskres_version": taskres.__version__,
        "torch_version": torch.__version__,
        "backbone": backbone.identity.to_json(),
        "dataset": {
            "name": dataset.name,
            **(dataset.source.to_json() if dataset.source else {}),
            "num_classes": dataset.num_classes,
            "templates": list(dataset.templates),
            "split_hash": dataset.split_hash,
        },
        "setup": setup.record(),
        **extra,
    }
