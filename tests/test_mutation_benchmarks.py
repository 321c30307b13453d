"""The benchmark readers' text files, checks and messages (taskres.data.benchmarks), on the tiny fake roots of
test_benchmarks.py, damaged here in the ways a real download can be (docs/mutation.md)."""

from __future__ import annotations

import logging
import shutil

import pytest
from test_benchmarks import (
    CLASSNAMES_TXT,
    WNIDS,
    make_fgvc,
    make_imagenet,
    make_imagenetv2,
    make_split_fake,
    make_variant,
)

from taskres.data.benchmarks import (
    BENCHMARKS,
    benchmark_for_split_file,
    benchmark_status,
    dg_row_index,
    load_benchmark,
    map_class_rows,
)
from taskres.errors import TaskResError


def hint(name, dataset_dir):
    return BENCHMARKS[name].download_hint(dataset_dir)


def message(call):
    with pytest.raises(TaskResError) as err:
        call()
    return str(err.value)


# ---- text files: variants.txt, images_variant_*.txt, classnames.txt ---------------------------------------------


def test_trailing_blank_lines_are_dropped_a_blank_line_inside_is_refused(tmp_path):
    make_fgvc(tmp_path)
    d = tmp_path / "fgvc_aircraft"
    variants = d / "variants.txt"
    variants.write_text("707-320\nCessna 172\nF/A-18\n\n \n")  # blank lines at the end: dropped
    assert load_benchmark("fgvc_aircraft", tmp_path).classnames == ("707-320", "Cessna 172", "F/A-18")
    variants.write_text("707-320\n\nCessna 172\n\nF/A-18\n")
    assert message(lambda: load_benchmark("fgvc_aircraft", tmp_path)) == (
        f"dataset 'fgvc_aircraft': {str(variants)!r} has a blank line at line 2; each line must name one entry. "
        "Remove the blank line."
    )
    variants.write_text("707-320\nCessna 172\nF/A-18\n")
    split = d / "images_variant_val.txt"
    lines = split.read_text().splitlines()
    split.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    assert message(lambda: load_benchmark("fgvc_aircraft", tmp_path)).startswith(
        f"dataset 'fgvc_aircraft': {str(split)!r} has a blank line at line 4;"
    )


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    make_fgvc(tmp_path)
    variants = tmp_path / "fgvc_aircraft/variants.txt"
    variants.write_bytes(b"707-320\nCessna \xff172\nF/A-18\n")
    try:
        variants.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        reason = str(err)
    assert message(lambda: load_benchmark("fgvc_aircraft", tmp_path)) == (
        f"dataset 'fgvc_aircraft': {str(variants)!r} is not UTF-8 text ({reason})."
    )


def test_fgvc_variants_listed_twice_and_variants_with_two_spaces(tmp_path):
    make_fgvc(tmp_path)
    d = tmp_path / "fgvc_aircraft"
    variants = d / "variants.txt"
    variants.write_text("707-320\nCessna 172\nF/A-18\n707-320\n")
    assert message(lambda: load_benchmark("fgvc_aircraft", tmp_path)) == (
        f"dataset 'fgvc_aircraft': variant '707-320' appears twice in {str(variants)!r}; "
        "each variant must be listed once."
    )
    # CoOp splits a split line on single spaces: a variant written with two spaces keeps them
    variants.write_text("707-320\nCessna  172\nF/A-18\n")
    for split in ("train", "val", "test"):
        path = d / f"images_variant_{split}.txt"
        path.write_text(path.read_text().replace("Cessna 172", "Cessna  172"))
    ds = load_benchmark("fgvc_aircraft", tmp_path)
    assert ds.classnames[1] == "Cessna  172" and {e.classname for e in ds.train if e.label == 1} == {"Cessna  172"}
    path = d / "images_variant_test.txt"
    path.write_text(path.read_text().replace("Cessna  172", "Cessna 172", 1))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.endswith(" Cessna 172"))
    assert message(lambda: load_benchmark("fgvc_aircraft", tmp_path)) == (
        f"dataset 'fgvc_aircraft': {str(path)!r} line {line} names variant 'Cessna 172', which {str(variants)!r} "
        "does not list; the two files come from the same archive: re-extract it."
    )


@pytest.mark.parametrize("name", ["imagenet", "imagenet_a", "imagenetv2"])
def test_classnames_txt_with_an_id_twice_or_a_blank_line(name, tmp_path):
    make = {"imagenet": make_imagenet, "imagenetv2": make_imagenetv2}.get(name, lambda r: make_variant(r, name))
    make(tmp_path)
    names_file = tmp_path / BENCHMARKS[name].dataset_dir / "classnames.txt"
    lines = CLASSNAMES_TXT.splitlines()
    names_file.write_text("\n".join(lines[:3] + [lines[1]] + lines[3:]) + "\n")
    assert message(lambda: load_benchmark(name, tmp_path)) == (
        f"dataset {name!r}: {str(names_file)!r} lists {WNIDS[1]!r} twice (line 4); each WordNet id must appear once."
    )
    names_file.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    assert message(lambda: load_benchmark(name, tmp_path)) == (
        f"dataset {name!r}: {str(names_file)!r} has a blank line at line 3; each line must name one entry. "
        "Remove the blank line."
    )


# ---- ImageNet and its variants -----------------------------------------------------------------------------------


def test_imagenet_folder_messages(tmp_path):
    make_imagenet(tmp_path)
    d = tmp_path / "imagenet"
    train, val = d / "images/train", d / "images/val"
    extra = [f"n000000{i:02d}" for i in range(12)]
    for wnid in extra[:6]:
        (train / wnid).mkdir()
    for wnid in extra[6:]:
        (val / wnid).mkdir()
    assert message(lambda: load_benchmark("imagenet", tmp_path)) == (
        f"dataset 'imagenet': {str(train)!r} and {str(val)!r} must hold the same wnid folders; only in train: "
        f"{extra[:5]}, only in val: {extra[6:11]}. Sort the validation images into wnid folders."
    )  # five of each side at most
    for wnid in extra[:6]:
        (train / wnid).rmdir()
    for wnid in extra[7:]:
        (val / wnid).rmdir()
    (train / extra[6]).mkdir()
    assert message(lambda: load_benchmark("imagenet", tmp_path)) == (
        f"dataset 'imagenet': class folder {str(train / extra[6])!r} is not listed in {str(d / 'classnames.txt')!r}; "
        "the folder names must be WordNet ids of ImageNet's classnames.txt (copy it from <root>/imagenet/)."
    )
    shutil.rmtree(train)
    train.mkdir()
    assert message(lambda: load_benchmark("imagenet", tmp_path)) == (
        f"dataset 'imagenet': {str(train)!r} holds no class folders; expected {str(train)}/<wnid>/<image>. "
        f"{hint('imagenet', d)}."
    )


def test_variant_without_class_folders_and_with_empty_ones(tmp_path):
    make_variant(tmp_path, "imagenet_r")
    d = tmp_path / "imagenet-rendition"
    images = d / "imagenet-r"
    for folder in images.iterdir():
        if folder.is_dir():
            for f in folder.iterdir():
                f.unlink()
    assert message(lambda: load_benchmark("imagenet_r", tmp_path)) == (
        f"dataset 'imagenet_r': the test split is empty ({BENCHMARKS['imagenet_r'].split_source} under {str(d)!r}); "
        f"re-install the dataset: {hint('imagenet_r', d)}."
    )
    shutil.rmtree(images)
    images.mkdir()
    assert message(lambda: load_benchmark("imagenet_r", tmp_path)) == (
        f"dataset 'imagenet_r': {str(images)!r} holds no class folders; expected {str(images)}/<wnid>/<image>. "
        f"{hint('imagenet_r', d)}."
    )


def test_imagenetv2_warns_when_classnames_are_not_sorted_and_names_a_missing_folder(tmp_path, caplog):
    make_imagenetv2(tmp_path)
    d = tmp_path / "imagenetv2"
    with caplog.at_level(logging.WARNING, logger="taskres.data.benchmarks"):
        load_benchmark("imagenetv2", tmp_path)
    assert "sorted WordNet-id order" not in caplog.text  # the file is sorted: no warning
    lines = CLASSNAMES_TXT.splitlines()
    (d / "classnames.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="taskres.data.benchmarks"):
        ds = load_benchmark("imagenetv2", tmp_path)
    assert ds.class_ids[:2] == (WNIDS[1], WNIDS[0])  # labels follow the file
    warned = [r.getMessage() for r in caplog.records if "sorted" in r.getMessage()]
    assert warned == [
        f"imagenetv2: {d / 'classnames.txt'} is not in sorted WordNet-id order, but ImageNetV2's folder i holds the "
        "i-th class in sorted order; labels follow the file, as in CoOp"
    ]
    folder = d / "imagenetv2-matched-frequency-format-val/2"
    shutil.rmtree(folder)
    assert message(lambda: load_benchmark("imagenetv2", tmp_path)) == (
        f"dataset 'imagenetv2': class folder for label 2 ({WNIDS[2]}) {str(folder)!r} does not exist. To install "
        f"ImageNetV2: {hint('imagenetv2', d)}."
    )


# ---- load_benchmark's checks ---------------------------------------------------------------------------------------


def test_missing_root_and_dataset_folder_whole_messages(tmp_path):
    nowhere = tmp_path / "nowhere"
    assert message(lambda: load_benchmark("dtd", nowhere)) == (
        f"dataset 'dtd': data root {str(nowhere)!r} does not exist; pass --root the folder that holds the dataset "
        "folders (this one is read from <root>/dtd/)."
    )
    assert message(lambda: load_benchmark("dtd", tmp_path)) == (
        f"dataset 'dtd': dataset folder {str(tmp_path / 'dtd')!r} does not exist. To install DescribableTextures: "
        f"{hint('dtd', tmp_path / 'dtd')}."
    )


def test_class_without_training_images_and_missing_images_whole_messages(tmp_path):
    # FGVC's labels come from variants.txt: 13 listed variants have no image in any split (ten are named)
    make_fgvc(tmp_path)
    f = tmp_path / "fgvc_aircraft"
    variants = [f"v{i:02d}" for i in range(13)]
    (f / "variants.txt").write_text("".join(v + "\n" for v in ["707-320", "Cessna 172", "F/A-18", *variants]))
    assert message(lambda: load_benchmark("fgvc_aircraft", tmp_path)) == (
        f"dataset 'fgvc_aircraft': class(es) {variants[:10]} have no training images in "
        f"{BENCHMARKS['fgvc_aircraft'].split_source}; every class needs at least one. The dataset is incomplete: "
        "re-install it."
    )
    (f / "variants.txt").write_text("707-320\nCessna 172\nF/A-18\n")
    ds = load_benchmark("fgvc_aircraft", tmp_path)
    total = len(ds.train) + len(ds.val) + len(ds.test)
    gone = [ds.path(ds.val[0]), ds.path(ds.test[-1])]
    for p in gone:
        p.unlink()
    assert message(lambda: load_benchmark("fgvc_aircraft", tmp_path)) == (
        f"dataset 'fgvc_aircraft': image {str(gone[0])!r} (val split of {BENCHMARKS['fgvc_aircraft'].split_source}) "
        f"does not exist; 2 of {total} listed images are missing. The images must lie under {str(ds.image_dir)!r} "
        f"at the paths the split lists. To install FGVCAircraft: {hint('fgvc_aircraft', f)}."
    )


# ---- status, split-file names, class rows --------------------------------------------------------------------------


def test_status_rows_in_full(tmp_path):
    make_split_fake(tmp_path, "dtd")
    rows = {r["name"]: r for r in benchmark_status(tmp_path)}
    assert list(rows) == list(BENCHMARKS)
    dtd, pets = tmp_path / "dtd", tmp_path / "oxford_pets"
    assert rows["dtd"] == {
        "name": "dtd",
        "path": str(dtd),
        "download": hint("dtd", dtd),
        "status": "ready",
        "reason": "",
    }
    assert rows["oxford_pets"] == {
        "name": "oxford_pets",
        "path": str(pets),
        "download": hint("oxford_pets", pets),
        "status": "missing",
        "reason": f"dataset folder {str(pets)!r} does not exist",
    }
    long_root = tmp_path / ("x" * 300)  # a name the filesystem refuses: every row says so, nothing raises
    rows = benchmark_status(long_root)
    first = rows[0]
    try:
        (long_root / BENCHMARKS["imagenet"].dataset_dir).is_dir()
    except OSError as err:
        reason = f"cannot read {str(long_root / 'imagenet')!r}: {err}"
    assert first["status"] == "incomplete" and first["reason"] == reason
    assert {r["status"] for r in rows} == {"incomplete"}


def test_benchmark_for_split_file():
    assert benchmark_for_split_file("/data/oxford_pets/split_zhou_OxfordPets.json") == "oxford_pets"
    assert benchmark_for_split_file("split_zhou_DescribableTextures.json") == "dtd"
    assert benchmark_for_split_file("/x/split_zhou_Unknown.json") is None


def test_class_rows_messages(tmp_path):
    source = [f"n{i:08d}" for i in range(3)]
    target = source[:1] + [f"n9{i:07d}" for i in range(11)]
    assert message(lambda: map_class_rows(source, target, "imagenet", "odd")) == (
        f"11 class(es) of 'odd' are not classes of 'imagenet': {target[1:11]}; the source classifier has no row for "
        "them. Train on a dataset whose classes include 'odd''s."
    )
    assert message(lambda: map_class_rows(source + source[:1], source, "twice", "t")) == (
        "dataset 'twice' lists a WordNet id twice; class ids must be unique."
    )
    make_split_fake(tmp_path, "dtd")
    dtd = load_benchmark("dtd", tmp_path)
    assert message(lambda: dg_row_index(dtd, dtd)) == (
        "dataset 'dtd' has no class ids (WordNet ids); mapping a classifier across datasets needs ImageNet or one of "
        "its variants (imagenetv2, imagenet_sketch, imagenet_a, imagenet_r)."
    )


def test_count_warnings_are_whole_lines(tmp_path, caplog):
    make_split_fake(tmp_path, "oxford_pets")
    with caplog.at_level(logging.WARNING, logger="taskres.data.benchmarks"):
        load_benchmark("oxford_pets", tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        "oxford_pets: 3 classes, but the published dataset has 37",
        "oxford_pets: train has 10 images, but the published split has 2944",
        "oxford_pets: val has 6 images, but the published split has 736",
        "oxford_pets: test has 5 images, but the published split has 3669",
    ]


@pytest.mark.parametrize(
    "name,rel,what",
    [("oxford_pets", "images", "image folder"), ("oxford_pets", "split_zhou_OxfordPets.json", "split file")],
)
def test_a_missing_required_path_says_what_it_is(name, rel, what, tmp_path):
    make_split_fake(tmp_path, name)
    d = tmp_path / BENCHMARKS[name].dataset_dir
    target = d / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert message(lambda: load_benchmark(name, tmp_path)) == (
        f"dataset {name!r}: {what} {str(target)!r} does not exist. To install {BENCHMARKS[name].coop_class}: "
        f"{hint(name, d)}."
    )
    assert hint(name, d).endswith(
        f"; put split_zhou_OxfordPets.json (linked from CoOp's DATASETS.md) in {d}/ "
        "(layouts and split files: https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"
    )
