"""Dataset splits (taskres.data.splits): a split file keeps its class names as written and refuses a class without
training images; an image folder's layout gives sorted classes and no val split."""

import json

import pytest

from taskres.data.splits import Entry, load_image_folder, load_split_file
from taskres.errors import TaskResError


def test_split_file_keeps_class_names_as_written(tmp_path):
    (tmp_path / "img").mkdir()
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps(
            {
                "train": [["a.jpg", 1, "american_bulldog"], ["b.jpg", 0, "Abyssinian"]],
                "val": [],
                "test": [["c.jpg", 0, "Abyssinian"]],
            }
        )
    )
    ds = load_split_file(split, tmp_path / "img")
    assert ds.classnames == ("Abyssinian", "american_bulldog")


def test_split_file_with_an_empty_class_is_refused(tmp_path):
    (tmp_path / "img").mkdir()
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"train": [["a.jpg", 0, "cat"]], "val": [], "test": [["c.jpg", 0, "cat"], ["d.jpg", 1, "dog"]]})
    )
    with pytest.raises(TaskResError, match=r"class\(es\) \['dog'\] have no training images"):
        load_split_file(split, tmp_path / "img")


def test_image_folder_layout(image_folder):
    ds = load_image_folder(image_folder)
    assert ds.classnames == ("blue", "green", "red")
    assert len(ds.train) == 15 and len(ds.test) == 9 and ds.val == ()
    assert ds.train[0] == Entry("train/blue/0.jpg", 0, "blue")
