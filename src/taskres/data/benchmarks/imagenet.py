"""ImageNet and its four domain-generalisation variants, read as CoOp's ``datasets/imagenet*.py`` read them.

- Class names come from a ``classnames.txt`` in the dataset's own folder (lines ``<wnid> <class name>``, the name
  being everything after the first space; CoOp's ``ImageNet.read_classnames``); each variant folder holds a copy
  of ImageNet's file. ``class_ids`` are the WordNet ids, ordered by label.
- ImageNet: labels are the sorted wnid folders of ``images/train``; ``images/val`` (the ILSVRC-2012 validation set,
  sorted into wnid folders) is the **test** set. The official code aliases val to test (``val=test``, only ever used
  to evaluate the last-epoch model) and draws no few-shot val (``sample_val=False``); since nothing draws from it
  or selects on it, ``val`` is left empty here so no caller encodes the 50,000 test images twice.
- ImageNet-A (``imagenet-adversarial/imagenet-a``), -R (``imagenet-rendition/imagenet-r``) and -Sketch
  (``imagenet-sketch/images``): labels are the sorted wnid folders (-A and -R hold 200 of the 1000 classes).
  CoOp skips a top-level ``README.txt`` there; here every non-folder entry is skipped.
- ImageNetV2 (``imagenetv2/imagenetv2-matched-frequency-format-val``): folders are numbered; folder ``i`` holds
  class ``i`` and CoOp names it with the ``i``-th line of ``classnames.txt`` (so the file must be in sorted-wnid
  order, as CoOp's is: a warning says when it is not). The number of classes is the number of lines, not a fixed
  1000.
- Variants are evaluation sets (CoOp: "used for testing only"): their entries are the test split; train and val
  are empty (CoOp passes the same list as ``train_x`` only because its base class needs one).
- File order within a class folder: CoOp keeps ``os.listdir`` order, which depends on the filesystem; here names
  are sorted, so the order (and with it an ImageNet few-shot draw) is the same on every machine, but it need not
  match what the official code drew on its authors' disks. Hidden entries (names starting with '.') are skipped,
  as Dassl's ``listdir_nohidden`` does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from taskres.data.benchmarks._base import (
    IMAGENET_TEMPLATES,
    BenchmarkSpec,
    Parts,
    Published,
    listdir_nohidden,
    read_text_lines,
)
from taskres.data.splits import Entry
from taskres.errors import TaskResValueError

log = logging.getLogger(__name__)


def read_classnames(spec: BenchmarkSpec, path: Path) -> dict[str, str]:
    """``{wnid: class name}`` in file order."""
    out: dict[str, str] = {}
    for n, line in enumerate(read_text_lines(spec, path), start=1):
        wnid, _, name = line.partition(" ")
        if wnid in out:
            raise TaskResValueError(
                f"dataset {spec.name!r}: {str(path)!r} lists {wnid!r} twice (line {n}); "
                "each WordNet id must appear once."
            )
        out[wnid] = name
    return out


def _class_folders(path: Path) -> list[str]:
    return [name for name in listdir_nohidden(path) if (path / name).is_dir()]


def _files(folder: Path) -> list[str]:
    return [name for name in listdir_nohidden(folder) if os.path.isfile(folder / name)]


def _lookup(spec: BenchmarkSpec, names: dict[str, str], wnid: str, where: Path, classnames_file: Path) -> str:
    if wnid not in names:
        raise TaskResValueError(
            f"dataset {spec.name!r}: class folder {str(where / wnid)!r} is not listed in {str(classnames_file)!r}; "
            "the folder names must be WordNet ids of ImageNet's classnames.txt (copy it from <root>/imagenet/)."
        )
    return names[wnid]


def _read_folders(
    split_dir: Path, prefix: str, wnids: list[str], labels: dict[str, int], names: dict[str, str]
) -> tuple[Entry, ...]:
    entries: list[Entry] = []
    for wnid in wnids:
        label, cname = labels[wnid], names[wnid]
        entries.extend(Entry(f"{prefix}{wnid}/{f}", label, cname) for f in _files(split_dir / wnid))
    return tuple(entries)


def read_imagenet(spec: BenchmarkSpec, dataset_dir: Path) -> Parts:
    image_dir = dataset_dir / "images"
    names_file = dataset_dir / "classnames.txt"
    names = read_classnames(spec, names_file)
    train_dir, val_dir = image_dir / "train", image_dir / "val"
    wnids = _class_folders(train_dir)
    if not wnids:
        raise TaskResValueError(
            f"dataset {spec.name!r}: {str(train_dir)!r} holds no class folders; expected "
            f"{str(train_dir)}/<wnid>/<image>. {spec.download_hint(dataset_dir)}."
        )
    val_wnids = _class_folders(val_dir)
    if val_wnids != wnids:
        only_train = sorted(set(wnids) - set(val_wnids))[:5]
        only_val = sorted(set(val_wnids) - set(wnids))[:5]
        # CoOp labels train and val folders separately, so differing sets would silently shift test labels.
        raise TaskResValueError(
            f"dataset {spec.name!r}: {str(train_dir)!r} and {str(val_dir)!r} must hold the same wnid folders; "
            f"only in train: {only_train}, only in val: {only_val}. Sort the validation images into wnid folders."
        )
    for wnid in wnids:
        _lookup(spec, names, wnid, train_dir, names_file)
    labels = {w: i for i, w in enumerate(wnids)}
    train = _read_folders(train_dir, "train/", wnids, labels, names)
    test = _read_folders(val_dir, "val/", wnids, labels, names)
    return Parts(image_dir, train, (), test, tuple(names[w] for w in wnids), tuple(wnids))


def read_sorted_variant(spec: BenchmarkSpec, dataset_dir: Path) -> Parts:
    image_dir = dataset_dir / spec.image_dir
    names_file = dataset_dir / "classnames.txt"
    names = read_classnames(spec, names_file)
    wnids = _class_folders(image_dir)
    if not wnids:
        raise TaskResValueError(
            f"dataset {spec.name!r}: {str(image_dir)!r} holds no class folders; expected "
            f"{str(image_dir)}/<wnid>/<image>. {spec.download_hint(dataset_dir)}."
        )
    for wnid in wnids:
        _lookup(spec, names, wnid, image_dir, names_file)
    labels = {w: i for i, w in enumerate(wnids)}
    test = _read_folders(image_dir, "", wnids, labels, names)
    return Parts(image_dir, (), (), test, tuple(names[w] for w in wnids), tuple(wnids))


def read_imagenetv2(spec: BenchmarkSpec, dataset_dir: Path) -> Parts:
    image_dir = dataset_dir / spec.image_dir
    names = read_classnames(spec, dataset_dir / "classnames.txt")
    wnids = list(names)
    if wnids != sorted(wnids):
        log.warning(
            "%s: %s is not in sorted WordNet-id order, but ImageNetV2's folder i holds the i-th class in "
            "sorted order; labels follow the file, as in CoOp",
            spec.name,
            dataset_dir / "classnames.txt",
        )
    entries: list[Entry] = []
    for label, wnid in enumerate(wnids):
        class_dir = image_dir / str(label)
        if not class_dir.is_dir():
            raise spec.missing(dataset_dir, f"class folder for label {label} ({wnid})", class_dir)
        entries.extend(Entry(f"{label}/{f}", label, names[wnid]) for f in _files(class_dir))
    return Parts(image_dir, (), (), tuple(entries), tuple(names[w] for w in wnids), tuple(wnids))


_COPY_NAMES = "; copy CoOp's classnames.txt from <root>/imagenet/ into {dir}/"

# Layouts: CoOp datasets/imagenet.py, imagenet_a.py, imagenet_r.py, imagenet_sketch.py, imagenetv2.py;
# templates: docs/protocol.md#base-classifier; counts: CoOp paper (ImageNet train 1,281,167 / test 50,000; V2 10,000;
# Sketch 50,889; A 7,500; R 30,000).
SPECS = (
    BenchmarkSpec(
        name="imagenet",
        coop_class="ImageNet",
        dataset_dir="imagenet",
        image_dir="images",
        split_source="images/{train,val}/<wnid>/ + classnames.txt",
        required=(
            ("images/train", "image folder"),
            ("images/val", "image folder"),
            ("classnames.txt", "class-name file"),
        ),
        templates=IMAGENET_TEMPLATES,
        published=Published(1000, 1281167, None, 50000),
        download="download ILSVRC-2012 from https://image-net.org and extract the training and validation sets so "
        "that {dir}/images/train/<wnid>/ and {dir}/images/val/<wnid>/ hold the images (validation images sorted "
        "into wnid folders); put CoOp's classnames.txt (lines '<wnid> <class name>', linked from CoOp's "
        "DATASETS.md) in {dir}/",
        reader=read_imagenet,
        sample_val=False,
        listed_images=True,
    ),
    BenchmarkSpec(
        name="imagenetv2",
        coop_class="ImageNetV2",
        dataset_dir="imagenetv2",
        image_dir="imagenetv2-matched-frequency-format-val",
        split_source="imagenetv2-matched-frequency-format-val/<label>/ + classnames.txt",
        required=(("imagenetv2-matched-frequency-format-val", "image folder"), ("classnames.txt", "class-name file")),
        templates=IMAGENET_TEMPLATES,
        published=Published(1000, None, None, 10000),
        download="download imagenetv2-matched-frequency.tar.gz (https://github.com/modestyachts/ImageNetV2) and "
        "extract it into {dir}/ so that {dir}/imagenetv2-matched-frequency-format-val/0/ ... exist" + _COPY_NAMES,
        reader=read_imagenetv2,
        sample_val=False,
        test_only=True,
        listed_images=True,
    ),
    BenchmarkSpec(
        name="imagenet_sketch",
        coop_class="ImageNetSketch",
        dataset_dir="imagenet-sketch",
        image_dir="images",
        split_source="images/<wnid>/ + classnames.txt",
        required=(("images", "image folder"), ("classnames.txt", "class-name file")),
        templates=IMAGENET_TEMPLATES,
        published=Published(1000, None, None, 50889),
        download="download ImageNet-Sketch (https://github.com/HaohanWang/ImageNet-Sketch) and extract it so that "
        "{dir}/images/<wnid>/ holds the sketches" + _COPY_NAMES,
        reader=read_sorted_variant,
        sample_val=False,
        test_only=True,
        listed_images=True,
    ),
    BenchmarkSpec(
        name="imagenet_a",
        coop_class="ImageNetA",
        dataset_dir="imagenet-adversarial",
        image_dir="imagenet-a",
        split_source="imagenet-a/<wnid>/ + classnames.txt",
        required=(("imagenet-a", "image folder"), ("classnames.txt", "class-name file")),
        templates=IMAGENET_TEMPLATES,
        published=Published(200, None, None, 7500),
        download="download imagenet-a.tar (https://github.com/hendrycks/natural-adv-examples) and extract it into "
        "{dir}/ so that {dir}/imagenet-a/<wnid>/ holds the images" + _COPY_NAMES,
        reader=read_sorted_variant,
        sample_val=False,
        test_only=True,
        listed_images=True,
    ),
    BenchmarkSpec(
        name="imagenet_r",
        coop_class="ImageNetR",
        dataset_dir="imagenet-rendition",
        image_dir="imagenet-r",
        split_source="imagenet-r/<wnid>/ + classnames.txt",
        required=(("imagenet-r", "image folder"), ("classnames.txt", "class-name file")),
        templates=IMAGENET_TEMPLATES,
        published=Published(200, None, None, 30000),
        download="download imagenet-r.tar (https://github.com/hendrycks/imagenet-r) and extract it into {dir}/ so "
        "that {dir}/imagenet-r/<wnid>/ holds the images" + _COPY_NAMES,
        reader=read_sorted_variant,
        sample_val=False,
        test_only=True,
        listed_images=True,
    ),
)
