"""The nine benchmarks that CoOp reads from its fixed split files ``split_zhou_<Name>.json``.

As CoOp's ``OxfordPets.read_split(split_path, path_prefix)``: every entry is ``[impath, label, classname]`` and
the image is ``os.path.join(path_prefix, impath)``. The prefix is the dataset's image folder, except for
StanfordCars, whose split paths (``cars_train/...``, ``cars_test/...``) are relative to the dataset folder itself.
Class names are kept exactly as written in the file (underscores included). The official code falls back to
building a split from the raw annotations when the file is missing; the published numbers come from the released
files, so here a missing split file is an error.
"""

from __future__ import annotations

from pathlib import Path

from taskres.data.benchmarks._base import BenchmarkSpec, Parts, Published
from taskres.data.splits import load_split_file


def read_coop_split(spec: BenchmarkSpec, dataset_dir: Path) -> Parts:
    image_dir = dataset_dir / spec.image_dir if spec.image_dir else dataset_dir
    s = load_split_file(dataset_dir / spec.split_source, image_dir, name=spec.name)
    return Parts(image_dir, s.train, s.val, s.test, s.classnames)


def _spec(name, coop_class, dataset_dir, image_dir, template, published, download, required=None):
    split = f"split_zhou_{coop_class}.json"
    if required is None:
        required = ((image_dir, "image folder"),)
    return BenchmarkSpec(
        name=name,
        coop_class=coop_class,
        dataset_dir=dataset_dir,
        image_dir=image_dir,
        split_source=split,
        required=required + ((split, "split file"),),
        templates=(template,),
        published=published,
        download=download + f"; put {split} (linked from CoOp's DATASETS.md) in {{dir}}/",
        reader=read_coop_split,
    )


# Folder names, image folders and split files: CoOp datasets/<name>.py. Templates: docs/protocol.md#base-classifier.
# Counts: CoOp paper.
SPECS = (
    _spec(
        "caltech101",
        "Caltech101",
        "caltech-101",
        "101_ObjectCategories",
        "a photo of a {}.",
        Published(100, 4128, 1649, 2465),
        "download 101_ObjectCategories.tar.gz (http://www.vision.caltech.edu/Image_Datasets/Caltech101/) and "
        "extract it into {dir}/ so that {dir}/101_ObjectCategories/<class>/ holds the images",
    ),
    _spec(
        "oxford_pets",
        "OxfordPets",
        "oxford_pets",
        "images",
        "a photo of a {}, a type of pet.",
        Published(37, 2944, 736, 3669),
        "download images.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ and extract it into {dir}/ "
        "so that {dir}/images/ holds the .jpg files",
    ),
    _spec(
        "stanford_cars",
        "StanfordCars",
        "stanford_cars",
        "",
        "a photo of a {}.",
        Published(196, 6509, 1635, 8041),
        "download cars_train.tgz and cars_test.tgz (https://ai.stanford.edu/~jkrause/cars/car_dataset.html) "
        "and extract them into {dir}/ so that {dir}/cars_train/ and {dir}/cars_test/ hold the images",
        required=(("cars_train", "image folder"), ("cars_test", "image folder")),
    ),
    _spec(
        "oxford_flowers",
        "OxfordFlowers",
        "oxford_flowers",
        "jpg",
        "a photo of a {}, a type of flower.",
        Published(102, 4093, 1633, 2463),
        "download 102flowers.tgz from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ and extract it into "
        "{dir}/ so that {dir}/jpg/ holds the images",
    ),
    _spec(
        "food101",
        "Food101",
        "food-101",
        "images",
        "a photo of {}, a type of food.",
        Published(101, 50500, 20200, 30300),
        "download food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ and extract "
        "it in the data root (it unpacks to {dir}/images/<class>/)",
    ),
    _spec(
        "sun397",
        "SUN397",
        "sun397",
        "SUN397",
        "a photo of a {}.",
        Published(397, 15880, 3970, 19850),
        "download SUN397.tar.gz from http://vision.princeton.edu/projects/2010/SUN/ and extract it into {dir}/ "
        "so that {dir}/SUN397/<letter>/<category>/ holds the images",
    ),
    _spec(
        "dtd",
        "DescribableTextures",
        "dtd",
        "images",
        "{} texture.",
        Published(47, 2820, 1128, 1692),
        "download dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and extract it in the "
        "data root (it unpacks to {dir}/images/<class>/)",
    ),
    _spec(
        "eurosat",
        "EuroSAT",
        "eurosat",
        "2750",
        "a centered satellite photo of {}.",
        Published(10, 13500, 5400, 8100),
        "download EuroSAT.zip (RGB, http://madm.dfki.de/files/sentinel/EuroSAT.zip) and extract it into {dir}/ "
        "so that {dir}/2750/<class>/ holds the images",
    ),
    _spec(
        "ucf101",
        "UCF101",
        "ucf101",
        "UCF-101-midframes",
        "a photo of a person doing {}.",
        Published(101, 7639, 1898, 3783),
        "download UCF-101-midframes.zip (middle video frames, linked from CoOp's DATASETS.md) and extract it "
        "into {dir}/ so that {dir}/UCF-101-midframes/<Action_Name>/ holds the frames",
    ),
)
