"""Opening a dataset: a named benchmark, a CoOp split file with its image folder, or an ImageFolder; and opening
again the dataset that a run recorded."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from taskres.data.splits import DEFAULT_TEMPLATES, DatasetSource, DatasetSplits, load_image_folder, load_split_file
from taskres.errors import TaskResValueError
from taskres.text import check_templates

logger = logging.getLogger(__name__)


def open_dataset(
    data: str | Path | None = None,
    split_file: str | Path | None = None,
    templates: Sequence[str] | None = None,
    dataset: str | None = None,
    root: str | Path | None = None,
) -> DatasetSplits:
    """A named benchmark (``dataset`` under ``root``), a CoOp split-file dataset (``data`` + ``split_file``) or an
    ImageFolder (``data/train``, ``data/test``). ``templates`` replace the dataset's default templates."""
    if dataset is not None:
        if data is not None or split_file is not None:
            raise TaskResValueError(
                "pass either `dataset` and `root`, or `data` (and `split_file`), not both.", param="dataset"
            )
        if root is None:
            raise TaskResValueError(
                f"dataset {dataset} needs `root`, the folder that holds CoOp's dataset folders.", param="root"
            )
        from taskres.data.benchmarks import load_benchmark

        ds = load_benchmark(dataset, root)
        return replace(ds, templates=check_templates(templates)) if templates else ds
    if data is None:
        raise TaskResValueError(
            "no dataset given: pass `data` (an image folder, with `split_file` for CoOp-format "
            "data), or `dataset` and `root` for a benchmark.",
            param="data",
        )
    if split_file is not None:
        from taskres.data.benchmarks import BENCHMARKS, benchmark_for_split_file

        # CoOp's own split file: the benchmark's name (its presets) and, unless given, its templates
        # (docs/protocol.md#base-classifier).
        known = benchmark_for_split_file(split_file)
        if known is not None:
            logger.info("%s is CoOp's split file of %s: using its presets and default templates", split_file, known)
        default = BENCHMARKS[known].templates if known is not None else DEFAULT_TEMPLATES
        return load_split_file(split_file, data, check_templates(templates) if templates else default, name=known or "")
    return load_image_folder(data, check_templates(templates) if templates else DEFAULT_TEMPLATES)


def reopen_dataset(source: DatasetSource, templates: Sequence[str]) -> DatasetSplits:
    """The dataset a run recorded in its config."""
    if source.kind == "benchmark":
        return open_dataset(dataset=source.dataset, root=source.root, templates=templates)
    return open_dataset(source.data, source.split_file, templates)
