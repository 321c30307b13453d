"""The published benchmarks, read from a data root exactly as the official CoOp code reads them.

``load_benchmark("oxford_pets", root)`` reads ``root/oxford_pets/`` (CoOp's folder names, image folders and split
files; CoOp's DATASETS.md describes the layouts) and returns a ``DatasetSplits`` named by the CoOp config name,
with the dataset's default templates (docs/protocol.md#base-classifier).
``benchmark_status(root)`` says which datasets are installed.
``dg_row_index`` maps an ImageNet-trained classifier onto a variant's classes by WordNet id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from taskres.data.benchmarks import coop_splits, fgvc_aircraft, imagenet
from taskres.data.benchmarks._base import BenchmarkSpec, Published, check_train_covers_classes, warn_on_counts
from taskres.data.benchmarks._base import check_images as _check_image_files
from taskres.data.splits import DatasetSource, DatasetSplits
from taskres.errors import TaskResFileNotFoundError, TaskResValueError, suggest

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "Published",
    "benchmark_status",
    "dg_row_index",
    "list_benchmarks",
    "load_benchmark",
    "map_class_rows",
    "benchmark_for_split_file",
]

# The paper's 11 few-shot benchmarks and ImageNet's shifted variants, in the paper's order.
PAPER_DATASETS = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
IMAGENET_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
_ORDER = PAPER_DATASETS + IMAGENET_VARIANTS
_ALL = {s.name: s for s in (*imagenet.SPECS, *coop_splits.SPECS, fgvc_aircraft.SPEC)}
# CoOp's config names (configs/datasets/<name>.yaml) -> spec, in the order of the paper's tables.
BENCHMARKS: Mapping[str, BenchmarkSpec] = MappingProxyType({name: _ALL[name] for name in _ORDER})


def list_benchmarks() -> list[str]:
    return list(BENCHMARKS)


def get_benchmark(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise TaskResValueError(f"unknown dataset {name!r}; {suggest(name, BENCHMARKS)}known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def benchmark_for_split_file(split_file: str | Path) -> str | None:
    """The benchmark whose CoOp split file has this file name (``split_zhou_OxfordPets.json`` -> oxford_pets)."""
    name = Path(split_file).name
    return next((spec.name for spec in BENCHMARKS.values() if spec.split_source == name), None)


def _abs_root(root: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(root))))


def _first_missing(spec: BenchmarkSpec, dataset_dir: Path) -> tuple[str, Path] | None:
    for rel, what in spec.required:
        if not (dataset_dir / rel).exists():
            return what, dataset_dir / rel
    return None


def load_benchmark(name: str, root: str | Path, *, check_images: bool = True) -> DatasetSplits:
    """Read benchmark ``name`` from ``root/<CoOp dataset folder>``.

    Entries hold paths relative to the returned ``image_dir``; class names (and, for ImageNet and its variants,
    WordNet ``class_ids``) are ordered by label. ``check_images`` verifies that every image a split file lists
    exists (folder-listed datasets reference only files that exist). Split sizes that differ from the published
    ones are logged as warnings, not errors.
    """
    spec = get_benchmark(name)
    root_abs = _abs_root(root)
    dataset_dir = root_abs / spec.dataset_dir
    if not root_abs.is_dir():
        raise TaskResFileNotFoundError(
            f"dataset {name!r}: data root {str(root_abs)!r} does not exist; pass "
            "--root the folder "
            "that holds the dataset folders (this one is read from "
            f"<root>/{spec.dataset_dir}/)."
        )
    if not dataset_dir.is_dir():
        raise spec.missing(dataset_dir, "dataset folder", dataset_dir)
    gap = _first_missing(spec, dataset_dir)
    if gap is not None:
        raise spec.missing(dataset_dir, *gap)
    parts = spec.reader(spec, dataset_dir)
    if not spec.test_only:
        check_train_covers_classes(spec, parts.train, parts.classnames)
    if not parts.test:
        raise TaskResValueError(
            f"dataset {name!r}: the test split is empty ({spec.split_source} under "
            f"{str(dataset_dir)!r}); re-install the dataset: {spec.download_hint(dataset_dir)}."
        )
    splits = {"train": parts.train, "val": parts.val, "test": parts.test}
    if check_images and not spec.listed_images:
        _check_image_files(spec, dataset_dir, parts.image_dir, splits)
    warn_on_counts(spec, len(parts.classnames), {k: len(v) for k, v in splits.items()})
    return DatasetSplits(
        name=name,
        image_dir=parts.image_dir,
        classnames=parts.classnames,
        templates=spec.templates,
        source=DatasetSource("benchmark", dataset=name, root=str(root_abs)),
        sample_val=spec.sample_val,
        class_ids=parts.class_ids,
        **splits,
    )


def benchmark_status(root: str | Path) -> list[dict]:
    """One row per benchmark: ``name``, ``status`` ("ready" / "missing" / "incomplete"), ``path`` (the dataset
    folder), ``reason`` (the first missing path, empty when ready) and ``download`` (how to install it).

    Only the folders and files each dataset needs are checked, not every image; nothing here raises on a partly
    installed root.
    """
    root_abs = _abs_root(root)
    rows = []
    for spec in BENCHMARKS.values():
        dataset_dir = root_abs / spec.dataset_dir
        row = {"name": spec.name, "path": str(dataset_dir), "download": spec.download_hint(dataset_dir)}
        try:
            if not dataset_dir.is_dir():
                row.update(status="missing", reason=f"dataset folder {str(dataset_dir)!r} does not exist")
            else:
                gap = _first_missing(spec, dataset_dir)
                if gap is None:
                    row.update(status="ready", reason="")
                else:
                    row.update(status="incomplete", reason=f"{gap[0]} {str(gap[1])!r} does not exist")
        except OSError as err:  # an unreadable folder is reported, not raised
            row.update(status="incomplete", reason=f"cannot read {str(dataset_dir)!r}: {err}")
        rows.append(row)
    return rows


def dg_row_index(source: DatasetSplits, target: DatasetSplits) -> list[int]:
    """For each class of ``target`` (in its label order), the row of ``source``'s ``(C, D)`` classifier.

    Classes are matched by WordNet id (``class_ids``), never by name: ImageNet's names repeat ("missile",
    "sunglasses"), where a name lookup would pick the first row. For ImageNet-V2 and -Sketch this is the identity.
    """
    for ds in (source, target):
        if not ds.class_ids:
            raise TaskResValueError(
                f"dataset {ds.name!r} has no class ids (WordNet ids); mapping a classifier across "
                "datasets needs ImageNet or one of its variants (imagenetv2, imagenet_sketch, "
                "imagenet_a, imagenet_r)."
            )
    return map_class_rows(source.class_ids, target.class_ids, source.name, target.name)


def map_class_rows(
    source_ids: Sequence[str], target_ids: Sequence[str], source_name: str, target_name: str
) -> list[int]:
    """Rows of a classifier over ``source_ids`` for each of ``target_ids``, matched by id."""
    row = {wnid: i for i, wnid in enumerate(source_ids)}
    if len(row) != len(source_ids):
        raise TaskResValueError(f"dataset {source_name!r} lists a WordNet id twice; class ids must be unique.")
    absent = [w for w in target_ids if w not in row]
    if absent:
        raise TaskResValueError(
            f"{len(absent)} class(es) of {target_name!r} are not classes of {source_name!r}: {absent[:10]}; the "
            f"source classifier has no row for them. Train on a dataset whose classes include {target_name!r}'s."
        )
    return [row[w] for w in target_ids]


def coop_zeroshot_templates(dataset: DatasetSplits) -> tuple[str, ...]:
    """The templates of CoOp's ``ZeroshotCLIP`` for a dataset (docs/protocol.md#coop-zero-shot-clip): a benchmark's
    one ``CUSTOM_TEMPLATES`` prompt ("a photo of a {}." for ImageNet and its variants, which otherwise use 8); for
    other datasets, or templates the user chose, the dataset's own templates."""
    spec = BENCHMARKS.get(dataset.name)
    if spec is None or tuple(dataset.templates) != tuple(spec.templates):
        return tuple(dataset.templates)
    return tuple(spec.templates) if len(spec.templates) == 1 else ("a photo of a {}.",)
