"""What every benchmark shares: its spec, the missing-path errors, and the checks run when it is read."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from taskres.data.splits import Entry
from taskres.errors import TaskResFileNotFoundError, TaskResValueError

log = logging.getLogger(__name__)

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"

# The 8 ImageNet prompts of docs/protocol.md#base-classifier, shared by ImageNet and its four variants.
IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of a {}.",
)


class Published(NamedTuple):
    """Class and image counts of the official splits; None where the split does not exist (ImageNet val).

    Source: the dataset-statistics table of the CoOp paper (Zhou et al., "Learning to Prompt for Vision-Language
    Models", IJCV 2022), which lists classes / train / val / test for the 11 datasets and the test sizes of the
    four ImageNet variants.
    """

    classes: int
    train: int | None
    val: int | None
    test: int


class Parts(NamedTuple):
    """What a reader returns: entries (paths relative to ``image_dir``), class names and ids ordered by label."""

    image_dir: Path
    train: tuple[Entry, ...]
    val: tuple[Entry, ...]
    test: tuple[Entry, ...]
    classnames: tuple[str, ...]
    class_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchmarkSpec:
    """One official benchmark as CoOp's ``datasets/<name>.py`` reads it.

    ``dataset_dir`` is CoOp's ``dataset_dir`` (the folder under the root); ``required`` lists the paths under it
    that must exist, each with what it is, in the order they are checked; ``download`` says how to install the
    dataset, with ``{dir}`` standing for the dataset folder.
    """

    name: str
    coop_class: str
    dataset_dir: str
    image_dir: str
    split_source: str
    required: tuple[tuple[str, str], ...]
    templates: tuple[str, ...]
    published: Published
    download: str
    reader: Callable[[BenchmarkSpec, Path], Parts]
    sample_val: bool = True
    # ImageNet's variants are evaluation sets only (CoOp: "This dataset is used for testing only").
    test_only: bool = False
    # Their entries come from listing folders, so every referenced image exists by construction.
    listed_images: bool = False

    def download_hint(self, dataset_dir: Path) -> str:
        return self.download.format(dir=str(dataset_dir)) + f" (layouts and split files: {COOP_DATASETS_MD})"

    def missing(self, dataset_dir: Path, what: str, path: Path) -> TaskResFileNotFoundError:
        return TaskResFileNotFoundError(
            f"dataset {self.name!r}: {what} {str(path)!r} does not exist. To install {self.coop_class}: "
            f"{self.download_hint(dataset_dir)}."
        )


def listdir_nohidden(path: Path) -> list[str]:
    """Dassl's ``listdir_nohidden``: entries not starting with '.', here sorted by name."""
    return sorted(name for name in os.listdir(path) if not name.startswith("."))


def check_images(
    spec: BenchmarkSpec, dataset_dir: Path, image_dir: Path, splits: Mapping[str, Sequence[Entry]]
) -> None:
    """Every referenced image must exist (Dassl's ``Datum`` asserts ``os.path.isfile``); name the first missing."""
    prefix = str(image_dir)
    missing: list[tuple[str, str]] = []
    total = 0
    for split, entries in splits.items():
        for e in entries:
            total += 1
            if not os.path.isfile(os.path.join(prefix, e.impath)):
                missing.append((split, e.impath))
    if missing:
        split, impath = missing[0]
        raise TaskResValueError(
            f"dataset {spec.name!r}: image {os.path.join(prefix, impath)!r} ({split} split of {spec.split_source}) "
            f"does not exist; {len(missing)} of {total} listed images are missing. The images must lie under "
            f"{prefix!r} at the paths the split lists. To install {spec.coop_class}: "
            f"{spec.download_hint(dataset_dir)}."
        )


def check_train_covers_classes(spec: BenchmarkSpec, train: Sequence[Entry], classnames: Sequence[str]) -> None:
    seen = {e.label for e in train}
    empty = [c for i, c in enumerate(classnames) if i not in seen]
    if empty:
        raise TaskResValueError(
            f"dataset {spec.name!r}: class(es) {empty[:10]} have no training images in {spec.split_source}; "
            "every class needs at least one. The dataset is incomplete: re-install it."
        )


def warn_on_counts(spec: BenchmarkSpec, num_classes: int, counts: dict[str, int]) -> None:
    """Log one warning per number that differs from the published splits (a partial or different download)."""
    pub = spec.published
    if num_classes != pub.classes:
        log.warning("%s: %d classes, but the published dataset has %d", spec.name, num_classes, pub.classes)
    for split in ("train", "val", "test"):
        expected = getattr(pub, split)
        if expected is not None and counts[split] != expected:
            log.warning(
                "%s: %s has %d images, but the published split has %d", spec.name, split, counts[split], expected
            )


def read_text_lines(spec: BenchmarkSpec, path: Path) -> list[str]:
    """Stripped lines; blank lines at the end are dropped (``readlines`` yields none for a final newline), and a
    blank line elsewhere is an error because it would shift every label after it."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise TaskResValueError(f"dataset {spec.name!r}: {str(path)!r} is not UTF-8 text ({err}).") from None
    while lines and not lines[-1]:
        lines.pop()
    if "" in lines:
        raise TaskResValueError(
            f"dataset {spec.name!r}: {str(path)!r} has a blank line at line {lines.index('') + 1}; "
            "each line must name one entry. Remove the blank line."
        )
    return lines
