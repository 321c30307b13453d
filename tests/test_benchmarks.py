"""The benchmark readers (taskres.data.benchmarks), on tiny fake roots written in each dataset's real (CoOp) layout:
classes, splits and templates, the official few-shot rule written out, and the text files, checks and whole messages
of roots damaged in the ways a real download can be (docs/mutation.md)."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from taskres.data.benchmarks import (
    BENCHMARKS,
    benchmark_for_split_file,
    benchmark_status,
    dg_row_index,
    list_benchmarks,
    load_benchmark,
    map_class_rows,
)
from taskres.data.sampling import sample_fewshot
from taskres.errors import TaskResError

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
# SPEC, "Base classifier".
TEMPLATES = {
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "stanford_cars": ("a photo of a {}.",),
    "sun397": ("a photo of a {}.",),
    "caltech101": ("a photo of a {}.",),
    "food101": ("a photo of {}, a type of food.",),
    "ucf101": ("a photo of a person doing {}.",),
    **{n: IMAGENET_TEMPLATES for n in ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")},
}
VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
SPLIT_FILE_SETS = (
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)


def _img(path: Path, i: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (i * 37 % 256, 90, 200)).save(path)


# ---- fake roots -------------------------------------------------------------------------------------------------

# name: (dataset folder, image folder relative to it, split file, class names, path of image n of class c in split)
SPLIT_FAKES = {
    "caltech101": (
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        ["accordion", "airplane", "face"],
        lambda c, n, s: f"{c}/image_{n:04d}.jpg",
    ),
    "oxford_pets": (
        "oxford_pets",
        "images",
        "split_zhou_OxfordPets.json",
        ["abyssinian", "american_bulldog", "american_pit_bull_terrier"],
        lambda c, n, s: f"{c}_{n}.jpg",
    ),
    "stanford_cars": (
        "stanford_cars",
        "",
        "split_zhou_StanfordCars.json",
        ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Acura TL Sedan"],
        lambda c, n, s: f"cars_{'test' if s == 'test' else 'train'}/{n:05d}.jpg",
    ),
    "oxford_flowers": (
        "oxford_flowers",
        "jpg",
        "split_zhou_OxfordFlowers.json",
        ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
        lambda c, n, s: f"image_{n:05d}.jpg",
    ),
    "food101": (
        "food-101",
        "images",
        "split_zhou_Food101.json",
        ["apple_pie", "baby_back_ribs", "baklava"],
        lambda c, n, s: f"{c}/{1000 + n}.jpg",
    ),
    "sun397": (
        "sun397",
        "SUN397",
        "split_zhou_SUN397.json",
        ["abbey", "airplane cabin", "indoor apse"],
        lambda c, n, s: f"a/{c.replace(' ', '_')}/sun_{n}.jpg",
    ),
    "dtd": (
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        ["banded", "blotchy", "braided"],
        lambda c, n, s: f"{c}/{c}_{n:04d}.jpg",
    ),
    "eurosat": (
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"],
        lambda c, n, s: f"{c.replace(' ', '')}/{c.replace(' ', '')}_{n}.jpg",
    ),
    "ucf101": (
        "ucf101",
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        ["Apply_Eye_Makeup", "Apply_Lipstick", "Archery"],
        lambda c, n, s: f"{c}/v_{c.replace('_', '')}_g01_c{n:02d}.jpg",
    ),
}
# Images per class (label 0, 1, 2): K = 1..4 takes a strict subset of some classes and all of others.
COUNTS = {"train": (5, 3, 2), "val": (2, 1, 3), "test": (2, 2, 1)}


def _interleave(items: list, seed: int) -> list:
    """Shuffle so that labels appear out of order, with label 2 first (first appearance != sorted order)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    first2 = next(i for i, it in enumerate(items) if it[1] == 2)
    items.insert(0, items.pop(first2))
    return items


def make_split_fake(root: Path, name: str) -> dict:
    folder, images, split_file, classes, path = SPLIT_FAKES[name]
    dataset_dir = root / folder
    image_dir = dataset_dir / images if images else dataset_dir
    n, splits = 0, {}
    for split, counts in COUNTS.items():
        items = []
        for label, (cname, count) in enumerate(zip(classes, counts)):
            for _ in range(count):
                n += 1
                rel = path(cname, n, split)
                _img(image_dir / rel, n)
                items.append([rel, label, cname])
        splits[split] = _interleave(items, n) if split == "train" else items
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / split_file).write_text(json.dumps(splits))
    if name == "stanford_cars":
        assert (dataset_dir / "cars_test").is_dir() and (dataset_dir / "cars_train").is_dir()
    return {"classnames": classes, "class_ids": (), "image_dir": image_dir, **splits}


FGVC_VARIANTS = ["707-320", "Cessna 172", "F/A-18"]


def make_fgvc(root: Path) -> dict:
    d = root / "fgvc_aircraft"
    d.mkdir(parents=True)
    (d / "variants.txt").write_text("".join(v + "\n" for v in FGVC_VARIANTS))
    n, out = 1000000, {}
    for split, counts in COUNTS.items():
        items = []
        for label, (cname, count) in enumerate(zip(FGVC_VARIANTS, counts)):
            for _ in range(count):
                n += 13
                _img(d / "images" / f"{n:07d}.jpg", n)
                items.append([f"{n:07d}", label, cname])
        if split == "train":
            items = _interleave(items, 7)
        (d / f"images_variant_{split}.txt").write_text("".join(f"{i} {c}\n" for i, _, c in items))
        out[split] = [[f"{i}.jpg", label, c] for i, label, c in items]
    return {"classnames": FGVC_VARIANTS, "class_ids": (), "image_dir": d / "images", **out}


# A fake ImageNet with ImageNet's duplicated names: two "missile" and two "sunglasses" classes.
WNIDS = ["n01440764", "n02123045", "n03773504", "n04008634", "n04355933", "n04356056"]
NAMES = ["tench", "tabby cat", "missile", "missile", "sunglasses", "sunglasses"]
CLASSNAMES_TXT = "".join(f"{w} {c}\n" for w, c in zip(WNIDS, NAMES))
IN_TRAIN, IN_VAL = (3, 5, 2, 4, 1, 3), (2, 2, 1, 2, 2, 1)
A_WNIDS = ["n01440764", "n04008634", "n04356056"]  # the second "missile", the second "sunglasses"
R_WNIDS = ["n02123045", "n03773504", "n04356056"]


def _class_folder(folder: Path, prefix: str, label: int, cname: str, count: int, seed: int, ext=".JPEG") -> list:
    """Write ``count`` images with names whose creation order is not their sorted order; return sorted entries."""
    names = [f"{random.Random(seed * 100 + i).randrange(10**6):06d}_{i}{ext}" for i in range(count)]
    for i, f in enumerate(names):
        _img(folder / f, seed + i)
    return [[f"{prefix}{f}", label, cname] for f in sorted(names)]


def make_imagenet(root: Path) -> dict:
    d = root / "imagenet"
    d.mkdir(parents=True)
    (d / "classnames.txt").write_text(CLASSNAMES_TXT)
    train, test = [], []
    for label, (w, c) in enumerate(zip(WNIDS, NAMES)):
        train += _class_folder(d / "images/train" / w, f"train/{w}/", label, c, IN_TRAIN[label], label)
        test += _class_folder(d / "images/val" / w, f"val/{w}/", label, c, IN_VAL[label], 50 + label)
    (d / "images/train" / WNIDS[0] / ".DS_Store").write_text("hidden: skipped")
    return {
        "classnames": NAMES,
        "class_ids": tuple(WNIDS),
        "image_dir": d / "images",
        "train": train,
        "val": [],
        "test": test,
    }


def make_variant(root: Path, name: str) -> dict:
    folder, images, wnids = {
        "imagenet_sketch": ("imagenet-sketch", "images", WNIDS),
        "imagenet_a": ("imagenet-adversarial", "imagenet-a", A_WNIDS),
        "imagenet_r": ("imagenet-rendition", "imagenet-r", R_WNIDS),
    }[name]
    d = root / folder
    (d / images).mkdir(parents=True)
    (d / "classnames.txt").write_text(CLASSNAMES_TXT)  # CoOp: a copy of ImageNet's file
    (d / images / "README.txt").write_text("not a class")
    test = []
    for label, w in enumerate(wnids):
        test += _class_folder(
            d / images / w, f"{w}/", label, NAMES[WNIDS.index(w)], 1 + label % 2, 7 * label, ext=".jpg"
        )
    return {
        "classnames": [NAMES[WNIDS.index(w)] for w in wnids],
        "class_ids": tuple(wnids),
        "image_dir": d / images,
        "train": [],
        "val": [],
        "test": test,
    }


def make_imagenetv2(root: Path) -> dict:
    d = root / "imagenetv2"
    images = d / "imagenetv2-matched-frequency-format-val"
    images.mkdir(parents=True)
    (d / "classnames.txt").write_text(CLASSNAMES_TXT)
    test = []
    for label, (_w, c) in enumerate(zip(WNIDS, NAMES)):
        test += _class_folder(images / str(label), f"{label}/", label, c, 2, 3 * label, ext=".jpeg")
    return {"classnames": NAMES, "class_ids": tuple(WNIDS), "image_dir": images, "train": [], "val": [], "test": test}


def make_fake(root: Path, name: str) -> dict:
    if name in SPLIT_FAKES:
        return make_split_fake(root, name)
    if name == "fgvc_aircraft":
        return make_fgvc(root)
    if name == "imagenet":
        return make_imagenet(root)
    if name == "imagenetv2":
        return make_imagenetv2(root)
    return make_variant(root, name)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, {name: make_fake(root, name) for name in list_benchmarks()}


def _copy_one(fake_root, name: str, dest: Path) -> Path:
    """A root holding only ``name`` (copied from the module's fake root), safe to damage."""
    root, _ = fake_root
    folder = BENCHMARKS[name].dataset_dir
    shutil.copytree(root / folder, dest / folder)
    return dest


def hint(name, dataset_dir):
    return BENCHMARKS[name].download_hint(dataset_dir)


def message(call):
    with pytest.raises(TaskResError) as err:
        call()
    return str(err.value)


# ---- the official few-shot rule, written out independently ------------------------------------------------------


def reference_fewshot(train: list, val: list, k: int, seed: int, sample_val: bool = True):
    """CoOp/Dassl: random.seed(seed); per label in order of first appearance, random.sample(items, k) or all
    items when fewer; then the val list the same way with min(k, 4), from the same stream."""
    state = random.getstate()
    try:
        random.seed(seed)

        def draw(items, shots):
            groups: dict = {}
            for item in items:
                groups.setdefault(item[1], []).append(item)
            picked = []
            for label in groups:
                group = groups[label]
                picked += random.sample(group, shots) if len(group) >= shots else group
            return picked

        tr = draw(train, k)
        va = draw(val, min(k, 4)) if sample_val else []
        return tr, va
    finally:
        random.setstate(state)


def _json(entries) -> list:
    return [e.to_json() for e in entries]


# ---- reading each benchmark ----------------------------------------------------------------------------------------


def test_registry_is_the_coop_config_names():
    assert list_benchmarks() == [
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
        "imagenetv2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
    ]
    assert list(BENCHMARKS) == list_benchmarks()
    # Published counts (CoOp paper, dataset statistics), spot-checked.
    assert BENCHMARKS["oxford_pets"].published[1:] == (2944, 736, 3669)
    assert BENCHMARKS["fgvc_aircraft"].published[1:] == (3334, 3333, 3333)
    assert BENCHMARKS["imagenet"].published[1:] == (1281167, None, 50000)
    assert BENCHMARKS["imagenet_a"].published.classes == 200


@pytest.mark.parametrize("name", list_benchmarks())
def test_reads_classes_splits_and_templates(name, fake_root):
    root, fakes = fake_root
    want = fakes[name]
    ds = load_benchmark(name, root)
    assert ds.name == name
    assert ds.classnames == tuple(want["classnames"])
    assert ds.class_ids == want["class_ids"]
    assert ds.templates == TEMPLATES[name]
    assert ds.image_dir == want["image_dir"]
    assert ds.source.to_json() == {"kind": "benchmark", "dataset": name, "root": str(root)}
    for split in ("train", "val", "test"):
        assert _json(getattr(ds, split)) == want[split], split
    for e in ds.train + ds.val + ds.test:
        assert ds.path(e).is_file()
    assert ds.sample_val is (name not in ("imagenet", *VARIANTS))


@pytest.mark.parametrize("name", [n for n in list_benchmarks() if n not in VARIANTS])
@pytest.mark.parametrize("shots,seed", [(1, 1), (2, 2), (4, 3), (16, 1)])
def test_fewshot_matches_the_official_rule(name, shots, seed, fake_root):
    root, fakes = fake_root
    ds = load_benchmark(name, root)
    got = sample_fewshot(ds, shots, seed)
    want_train, want_val = reference_fewshot(
        fakes[name]["train"], fakes[name]["val"], shots, seed, sample_val=name != "imagenet"
    )
    assert _json(got["train"]) == want_train
    assert _json(got["val"]) == want_val


def test_class_names_keep_underscores_and_spaces(fake_root):
    root, _ = fake_root
    assert load_benchmark("oxford_pets", root).classnames[2] == "american_pit_bull_terrier"
    assert load_benchmark("fgvc_aircraft", root).classnames == ("707-320", "Cessna 172", "F/A-18")


def test_benchmark_for_split_file():
    assert benchmark_for_split_file("/data/oxford_pets/split_zhou_OxfordPets.json") == "oxford_pets"
    assert benchmark_for_split_file("split_zhou_DescribableTextures.json") == "dtd"
    assert benchmark_for_split_file("/x/split_zhou_Unknown.json") is None


# ---- text files: variants.txt, images_variant_*.txt, classnames.txt ------------------------------------------------


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


# ---- ImageNet and its variants -------------------------------------------------------------------------------------


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


def test_variant_folder_must_be_a_listed_wnid(fake_root, tmp_path):
    root = _copy_one(fake_root, "imagenet_r", tmp_path)
    _img(root / "imagenet-rendition/imagenet-r/n99999999/x.jpg")
    with pytest.raises(
        TaskResError,
        match=r"class folder '.*imagenet-r/n99999999' is not listed in "
        r"'.*imagenet-rendition/classnames\.txt'",
    ):
        load_benchmark("imagenet_r", root)


# ---- domain generalisation -----------------------------------------------------------------------------------------


def test_dg_rows_map_by_wordnet_id_not_by_name(fake_root):
    root, _ = fake_root
    source = load_benchmark("imagenet", root)
    a, r = load_benchmark("imagenet_a", root), load_benchmark("imagenet_r", root)
    assert dg_row_index(source, a) == [0, 3, 5]
    assert dg_row_index(source, r) == [1, 2, 5]
    # The official name lookup (list.index) would pick the first "missile" / "sunglasses" rows instead.
    assert [list(source.classnames).index(c) for c in a.classnames] == [0, 2, 4]
    for name in ("imagenetv2", "imagenet_sketch"):
        assert dg_row_index(source, load_benchmark(name, root)) == list(range(len(WNIDS)))


def test_dg_rejects_classes_absent_from_the_source(fake_root):
    root, _ = fake_root
    source = load_benchmark("imagenet", root)
    a = load_benchmark("imagenet_a", root)
    odd = dataclasses.replace(a, class_ids=("n01440764", "n09999999", "n04356056"))
    with pytest.raises(
        TaskResError,
        match=r"1 class\(es\) of 'imagenet_a' are not classes of 'imagenet': "
        r"\['n09999999'\]",
    ):
        dg_row_index(source, odd)
    with pytest.raises(TaskResError, match="dataset 'dtd' has no class ids"):
        dg_row_index(source, load_benchmark("dtd", root))


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


# ---- load_benchmark's checks ---------------------------------------------------------------------------------------


def test_unknown_name_suggests_the_close_one(tmp_path):
    with pytest.raises(
        TaskResError,
        match=r"unknown dataset 'oxford_pet'; did you mean 'oxford_pets'.*"
        r"\? known: imagenet, caltech101, oxford_pets",
    ):
        load_benchmark("oxford_pet", tmp_path)


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
    assert hint("dtd", tmp_path / "dtd").startswith("download dtd-r1.0.1.tar.gz")


REQUIRED = [(name, rel) for name in list_benchmarks() for rel, _ in BENCHMARKS[name].required]


@pytest.mark.parametrize("name,rel", REQUIRED, ids=[f"{n}:{r}" for n, r in REQUIRED])
def test_each_missing_required_path_is_named(name, rel, fake_root, tmp_path):
    root = _copy_one(fake_root, name, tmp_path)
    target = root / BENCHMARKS[name].dataset_dir / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(TaskResError, match=rf"dataset '{name}': .* '[^']*/{rel}' does not exist\. To install "):
        load_benchmark(name, root)
    row = {r["name"]: r for r in benchmark_status(root)}[name]
    assert row["status"] == "incomplete" and str(target) in row["reason"]


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


def test_pinned_messages_for_split_file_and_classnames(fake_root, tmp_path):
    root = _copy_one(fake_root, "oxford_pets", tmp_path)
    _copy_one(fake_root, "imagenet_a", root)
    (root / "oxford_pets/split_zhou_OxfordPets.json").unlink()
    with pytest.raises(
        TaskResError,
        match=r"dataset 'oxford_pets': split file '.*/oxford_pets/"
        r"split_zhou_OxfordPets\.json' does not exist\. To install OxfordPets: "
        r".*put split_zhou_OxfordPets\.json .* in .*/oxford_pets/",
    ):
        load_benchmark("oxford_pets", root)
    (root / "imagenet-adversarial/classnames.txt").unlink()
    with pytest.raises(
        TaskResError,
        match=r"dataset 'imagenet_a': class-name file '.*/imagenet-adversarial/"
        r"classnames\.txt' does not exist\. To install ImageNetA: .*copy CoOp's "
        r"classnames\.txt from <root>/imagenet/",
    ):
        load_benchmark("imagenet_a", root)


@pytest.mark.parametrize("name", [*SPLIT_FILE_SETS, "fgvc_aircraft"])
def test_missing_image_is_named(name, fake_root, tmp_path):
    root = _copy_one(fake_root, name, tmp_path)
    ds = load_benchmark(name, root)
    gone = ds.path(ds.test[-1])
    gone.unlink()
    with pytest.raises(
        TaskResError,
        match=rf"dataset '{name}': image '{gone}' \(test split of .*\) does not "
        r"exist; 1 of \d+ listed images are missing",
    ):
        load_benchmark(name, root)
    assert len(load_benchmark(name, root, check_images=False).test) == len(ds.test)


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


# ---- status --------------------------------------------------------------------------------------------------------


def test_status_ready_missing_incomplete(fake_root, tmp_path):
    root, _ = fake_root
    assert [(r["name"], r["status"]) for r in benchmark_status(root)] == [(n, "ready") for n in list_benchmarks()]
    rows = benchmark_status(tmp_path / "nowhere")
    assert {r["status"] for r in rows} == {"missing"}
    assert "dataset folder" in rows[0]["reason"] and "image-net.org" in rows[0]["download"]
    (tmp_path / "eurosat/2750").mkdir(parents=True)
    row = {r["name"]: r for r in benchmark_status(tmp_path)}["eurosat"]
    assert row["status"] == "incomplete"
    assert row["reason"] == f"split file '{tmp_path / 'eurosat/split_zhou_EuroSAT.json'}' does not exist"
    assert "split_zhou_EuroSAT.json" in row["download"]


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
