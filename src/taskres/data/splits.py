"""Datasets as lists of split entries: CoOp's split-file format and a plain ImageFolder layout.

An entry is ``(impath, label, classname)`` with ``impath`` relative to the dataset's image folder, exactly as in
CoOp's ``split_zhou_<Name>.json`` files.
Class names are kept as written (underscores included: docs/protocol.md#base-classifier).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from taskres.errors import TaskResFileNotFoundError, TaskResValueError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_TEMPLATES = ("a photo of a {}.",)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One labelled image: ``impath`` is relative to the dataset's image folder."""

    impath: str
    label: int
    classname: str

    def to_json(self) -> list:
        return [self.impath, self.label, self.classname]

    @classmethod
    def from_json(cls, item: Sequence, where: str) -> Entry:
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise TaskResValueError(f"{where}: an entry must be [relative_image_path, label, classname]; got {item!r}.")
        impath, label, classname = item
        if not isinstance(impath, str) or not isinstance(classname, str):
            raise TaskResValueError(f"{where}: entry {item!r} needs a string path and a string class name.")
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int):
            raise TaskResValueError(f"{where}: entry {item!r} has a label that is not an integer.")
        if label < 0:
            raise TaskResValueError(f"{where}: entry {item!r} has a negative label; labels are 0..C-1.")
        check_relative_path(impath, f"{where}: entry {item!r}")
        return cls(impath, label, classname)


def check_relative_path(impath: str, where: str) -> None:
    """An image path of a split must stay inside the image folder: relative, no ``..`` that climbs out, no NUL."""
    if not impath or "\0" in impath:
        raise TaskResValueError(f"{where}: the image path is empty or holds a NUL byte.")
    if os.path.isabs(impath):
        raise TaskResValueError(
            f"{where}: the image path is absolute; split paths must be relative to the image folder (--data)."
        )
    if os.path.normpath(impath).split(os.sep)[0] == "..":
        raise TaskResValueError(
            f"{where}: the image path leads outside the image folder (..); split paths must stay inside it."
        )


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset's splits came from, recorded in run folders so that ``eval`` can open it again.

    kind "split_file": ``data`` (the image folder) and ``split_file``; "image_folder": ``data``; "benchmark":
    ``dataset`` (a benchmark name) under ``root``. Paths are absolute.
    """

    kind: Literal["split_file", "image_folder", "benchmark"]
    data: str | None = None
    split_file: str | None = None
    dataset: str | None = None
    root: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, record: dict) -> DatasetSource:
        known = ("kind", "data", "split_file", "dataset", "root")
        if record.get("kind") not in ("split_file", "image_folder", "benchmark"):
            raise TaskResValueError(
                f"unknown dataset source kind {record.get('kind')!r} in a run's config; known: "
                "split_file, image_folder, benchmark.",
                param="source",
            )
        return cls(**{k: record[k] for k in known if record.get(k) is not None})


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset: its image folder, its train/val/test entries, class names ordered by label, default templates.

    ``source`` says where the splits came from (a split file, an ImageFolder, a named benchmark) and is recorded
    in run folders; ``split_hash`` identifies the exact entry lists.
    """

    name: str
    image_dir: Path
    train: tuple[Entry, ...]
    val: tuple[Entry, ...]
    test: tuple[Entry, ...]
    classnames: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    source: DatasetSource | None = None
    # Few-shot val is drawn with min(K, 4) shots unless a dataset says otherwise (ImageNet draws none).
    sample_val: bool = True
    # Stable class identifiers (WordNet ids for ImageNet and its variants), ordered by label; empty if none.
    class_ids: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def split_hash(self) -> str:
        return entries_hash({"train": self.train, "val": self.val, "test": self.test})

    def path(self, entry: Entry) -> Path:
        return self.image_dir / entry.impath


def entries_hash(splits: dict[str, Sequence[Entry]]) -> str:
    """A short hash of entry lists, stable across runs and machines."""
    payload = json.dumps({k: [e.to_json() for e in v] for k, v in sorted(splits.items())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def classnames_from_entries(entries: Sequence[Entry], where: str) -> tuple[str, ...]:
    """Class names ordered by label; every label 0..C-1 must be named, and named once."""
    names: dict[int, str] = {}
    for e in entries:
        if names.setdefault(e.label, e.classname) != e.classname:
            raise TaskResValueError(
                f"{where}: label {e.label} is named both {names[e.label]!r} and {e.classname!r}; "
                "each label needs exactly one class name."
            )
    if not names:
        raise TaskResValueError(f"{where}: no entries; the dataset is empty.")
    # C distinct labels fill 0..C-1 exactly when none is >= C (linear in the entries, whatever the labels' size).
    too_large = [label for label in names if label >= len(names)]
    if too_large:
        missing = [i for i in range(len(names)) if i not in names]
        raise TaskResValueError(
            f"{where}: labels must run 0..C-1 with no gaps, but {len(names)} classes have label(s) up to "
            f"{max(too_large)} and no entry has label(s) {missing[:10]}; an empty class cannot be learned or "
            "evaluated. Remove the gap or add images for it."
        )
    return tuple(names[i] for i in range(len(names)))


def check_classnames(classnames: Sequence[str], where: str) -> None:
    """A line break in a class name is an error; names that differ only in case or whitespace are a warning."""
    for name in classnames:
        if name and name.splitlines() != [name]:
            raise TaskResValueError(
                f"{where}: class name {name!r} holds a line break; class names are printed one to a line (predict, "
                "reports, results.md) and go into the prompts. Remove it from the class name."
            )
    groups: dict[str, list[str]] = {}
    for name in classnames:
        groups.setdefault(" ".join(name.split()).casefold(), []).append(name)
    for same in (g for g in groups.values() if len(g) > 1):
        logger.warning(
            "%s: class names %s differ only in case or whitespace; CLIP's tokenizer lowercases and collapses "
            "whitespace, so their prompts are the same and the zero-shot classifier cannot tell them apart. Rename "
            "one if they are different classes, or merge them.",
            where,
            " and ".join(repr(n) for n in same),
        )


def check_split_entries(splits: Mapping[str, Sequence[Entry]], where: str) -> None:
    """A path listed twice in one split is an error; one in both train and test is logged as a warning."""
    seen: dict[str, set[str]] = {}
    for key, entries in splits.items():
        paths: set[str] = set()
        for e in entries:
            norm = os.path.normpath(e.impath)
            if norm in paths:
                raise TaskResValueError(
                    f"{where}: {e.impath!r} is listed twice in '{key}'; each image may appear "
                    "once per split. Remove the duplicate."
                )
            paths.add(norm)
        seen[key] = paths
    both = seen.get("train", set()) & seen.get("test", set())
    if both:
        logger.warning(
            "%s: %d image(s) are in both train and test (e.g. %r); test accuracy will be optimistic",
            where,
            len(both),
            sorted(both)[0],
        )


def load_split_file(
    split_file: str | Path, image_dir: str | Path, templates: Sequence[str] = DEFAULT_TEMPLATES, name: str = ""
) -> DatasetSplits:
    """Read a CoOp split file (``{"train": [...], "val": [...], "test": [...]}``); paths are relative to image_dir."""
    split_file, image_dir = Path(split_file), Path(image_dir)
    if not image_dir.is_dir():
        raise TaskResFileNotFoundError(
            f"data folder {str(image_dir)!r} does not exist; pass --data the folder "
            "that the split "
            "file's image paths are relative to."
        )
    if not split_file.is_file():
        raise TaskResFileNotFoundError(
            f"split file {str(split_file)!r} does not exist; pass --split-file a CoOp "
            "split JSON "
            "(split_zhou_<Name>.json), or leave it out to read --data as an ImageFolder."
        )
    try:
        text = split_file.read_text()
    except OSError as err:
        raise TaskResValueError(
            f"split file {str(split_file)!r} cannot be read ({err.strerror}).", param="split_file"
        ) from None
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, or an integer past Python's digit limit
        raise TaskResValueError(
            f"split file {str(split_file)!r} is not valid JSON ({err}); expected "
            '{"train": [...], "val": [...], "test": [...]}.'
        ) from None
    if not isinstance(raw, dict) or not all(k in raw for k in ("train", "test")):
        raise TaskResValueError(
            f"split file {str(split_file)!r} must be a JSON object with 'train', 'val' and 'test' "
            "lists of [relative_image_path, label, classname]."
        )
    splits = {}
    for key in ("train", "val", "test"):
        items = raw.get(key, [])
        if not isinstance(items, list):
            raise TaskResValueError(f"split file {str(split_file)!r}: '{key}' must be a list of entries.")
        splits[key] = tuple(Entry.from_json(item, f"split file {str(split_file)!r} ({key})") for item in items)
    check_split_entries(splits, f"split file {str(split_file)!r}")
    classnames = classnames_from_entries(splits["train"] + splits["val"] + splits["test"], f"split file {split_file}")
    check_classnames(classnames, f"split file {str(split_file)!r}")
    for key in ("train", "test"):
        if not splits[key]:
            raise TaskResValueError(f"split file {str(split_file)!r} has no '{key}' entries.")
    _check_every_class_present(splits["train"], classnames, f"split file {str(split_file)!r} (train)")
    return DatasetSplits(
        name=name or split_file.stem,
        image_dir=image_dir,
        classnames=classnames,
        templates=tuple(templates),
        source=DatasetSource("split_file", data=str(image_dir.resolve()), split_file=str(split_file.resolve())),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
    )


def load_image_folder(root: str | Path, templates: Sequence[str] = DEFAULT_TEMPLATES, name: str = "") -> DatasetSplits:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` (optional ``root/val/<class>/*``).

    Classes are the sorted folder names of ``train/``; labels follow that order. Files are sorted by name.
    """
    root = Path(root)
    if not root.is_dir():
        raise TaskResFileNotFoundError(f"data folder {str(root)!r} does not exist; pass --data an existing folder.")
    train_dir = root / "train"
    if not train_dir.is_dir() or not (root / "test").is_dir():
        raise TaskResValueError(
            f"data folder {str(root)!r} has no split file and is not an ImageFolder layout: expected "
            f"{str(root / 'train')}/<class>/* and {str(root / 'test')}/<class>/* (optional val/). "
            "Pass --split-file for CoOp-format data."
        )
    try:
        return _load_image_folder(root, train_dir, templates, name)
    except PermissionError as err:
        raise TaskResValueError(
            f"data folder {str(root)!r}: {err.filename!r} cannot be read ({err.strerror}); fix its permissions.",
            param="data",
        ) from None


def _load_image_folder(root: Path, train_dir: Path, templates: Sequence[str], name: str) -> DatasetSplits:
    classnames = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))
    if not classnames:
        raise TaskResValueError(f"{str(train_dir)!r} holds no class folders; expected train/<class>/<image>.")
    check_classnames(classnames, f"ImageFolder {str(train_dir)!r}")
    splits = {}
    for split in ("train", "val", "test"):
        split_dir = root / split
        entries = []
        if split_dir.is_dir():
            extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classnames)
            if extra:
                raise TaskResValueError(
                    f"{str(split_dir)!r} has class folder(s) {extra} that train/ lacks; "
                    "every class "
                    "must have training images."
                )
            for label, cname in enumerate(classnames):
                cdir = split_dir / cname
                if not cdir.is_dir():
                    continue
                for f in sorted(cdir.iterdir()):
                    if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                        entries.append(Entry(f"{split}/{cname}/{f.name}", label, cname))
        splits[split] = tuple(entries)
    _check_every_class_present(splits["train"], classnames, f"ImageFolder {str(train_dir)!r}")
    if not splits["test"]:
        raise TaskResValueError(f"{str(root / 'test')!r} holds no images; put test images in test/<class>/.")
    return DatasetSplits(
        name=name or root.name,
        image_dir=root,
        classnames=classnames,
        templates=tuple(templates),
        source=DatasetSource("image_folder", data=str(root.resolve())),
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
    )


def _check_every_class_present(entries: Sequence[Entry], classnames: Sequence[str], where: str) -> None:
    counts = [0] * len(classnames)
    for e in entries:
        counts[e.label] += 1
    empty = [classnames[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        raise TaskResValueError(
            f"{where}: class(es) {empty[:10]} have no training images; every class needs at "
            "least one. Add images or remove the class."
        )
