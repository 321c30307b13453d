"""Few-shot images from a file instead of a draw: Dassl's cached few-shot split or a run's ``fewshot_split.json``.

Dassl's datasets cache each draw as ``<dataset>/split_fewshot/shot_<K>-seed_<S>.pkl``: a pickle of ``{"train":
[Datum, ...], "val": [Datum, ...]}`` (ImageNet: train only), each ``Datum`` holding ``_impath`` (an absolute path on
the machine that wrote it), ``_label``, ``_domain`` and ``_classname`` (docs/protocol.md#few-shot-sampling). The
pickle is read with an allow-list (``taskres.safe_load``): a ``Datum`` becomes a plain record and nothing else may be
built. Paths are matched to the dataset by the longest tail of the path that is an entry's path relative to the
image folder; labels and class names must agree with the dataset's.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from taskres.data.splits import DatasetSplits, Entry
from taskres.errors import TaskResFileNotFoundError, TaskResValueError
from taskres.safe_load import load_plain_pickle

DATUM = "dassl.data.datasets.base_dataset.Datum"


class PlainDatum:
    """What a pickled Dassl ``Datum`` is read as: its state, and nothing that runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _records(raw: Any, where: str) -> dict[str, list[tuple[str, int, str]]]:
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), list):
        raise TaskResValueError(
            f"{where} must hold {{'train': [...], 'val': [...]}} (Dassl's few-shot split); got {type(raw).__name__}.",
            param="fewshot_file",
        )
    out = {}
    for split in ("train", "val"):
        items = []
        for item in raw.get(split) or []:
            if isinstance(item, PlainDatum):
                s = item.state
                impath, label, classname = s.get("_impath"), s.get("_label"), s.get("_classname")
            elif isinstance(item, (list, tuple)) and len(item) == 3:
                impath, label, classname = item
            else:
                raise TaskResValueError(
                    f"{where}: {split} entry {item!r} is neither a Datum nor [path, label, classname].",
                    param="fewshot_file",
                )
            if (
                not isinstance(impath, str)
                or isinstance(label, bool)
                or not isinstance(label, int)
                or not isinstance(classname, str)
            ):
                raise TaskResValueError(
                    f"{where}: {split} entry ({impath!r}, {label!r}, {classname!r}) needs a "
                    "string path, an integer label and a string class name.",
                    param="fewshot_file",
                )
            items.append((impath, label, classname))
        out[split] = items
    return out


def _match(impath: str, index: dict[str, Any]) -> Any:
    """The value whose key (a relative path) is the longest tail of ``impath`` (on whole path components)."""
    parts = [p for p in re.split(r"[\\/]+", impath) if p]
    for k in range(len(parts), 0, -1):
        entry = index.get("/".join(parts[-k:]))
        if entry is not None:
            return entry
    return None


def load_fewshot_file(path: str | Path, dataset: DatasetSplits) -> tuple[dict[str, list[Entry]], dict]:
    """({"train": [...], "val": [...]} entries of ``dataset``, info with the file, its sha256, K and the seed its
    name gives (or None))."""
    path = Path(path)
    where = f"few-shot file {str(path)!r}"
    if not path.is_file():
        raise TaskResFileNotFoundError(
            f"{where} does not exist; pass a Dassl split_fewshot/shot_<K>-seed_<S>.pkl or a run's fewshot_split.json.",
            param="fewshot_file",
        )
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TaskResValueError(f"{where} is not valid JSON ({err}).", param="fewshot_file") from None
    else:
        raw = load_plain_pickle(path, {DATUM: PlainDatum}, what="few-shot file")
    records = _records(raw, where)
    splits = {"train": dataset.train, "val": dataset.val}
    split_of = {e.impath: name for name in ("test", "val", "train") for e in getattr(dataset, name)}
    fewshot: dict[str, list[Entry]] = {}
    for split, items in records.items():
        index = {e.impath: e for e in splits[split]}
        entries = []
        for impath, label, classname in items:
            entry = _match(impath, index)
            if entry is None:
                elsewhere = _match(impath, split_of)
                hint = (
                    f" (it is in the dataset's {elsewhere} split)"
                    if elsewhere is not None
                    else f" (no entry of {str(dataset.image_dir)!r} ends with a tail of that path)"
                )
                raise TaskResValueError(
                    f"{where}: {split} image {impath!r} is not a {split} image of dataset "
                    f"{dataset.name!r}{hint}; use the file made for this dataset.",
                    param="fewshot_file",
                )
            if (entry.label, entry.classname) != (label, classname):
                raise TaskResValueError(
                    f"{where}: image {impath!r} has label {label} ({classname!r}) in the file but "
                    f"{entry.label} ({entry.classname!r}) in dataset {dataset.name!r}; the file "
                    "was made for other splits or class names.",
                    param="fewshot_file",
                )
            entries.append(entry)
        fewshot[split] = entries
    if not fewshot["train"]:
        raise TaskResValueError(f"{where} lists no training images.", param="fewshot_file")
    per_label: dict[int, int] = {}
    for e in fewshot["train"]:
        per_label[e.label] = per_label.get(e.label, 0) + 1
    seed = re.search(r"seed_(-?\d+)", path.name)
    info = {
        "fewshot_file": str(path.resolve()),
        "fewshot_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "shots": max(per_label.values()),
        "seed": int(seed.group(1)) if seed else None,
    }
    return fewshot, info
