"""`train --views`, end to end through the CLI: a copied dataset trains to the same classifier with cached and
with online views, online views draw fresh augmentations every epoch (as many encoder passes), and the methods that
do not train on augmentations refuse them. The views themselves: tests/test_views.py."""

import json
import shutil

import pytest
import torch
from conftest import run_cli as run
from safetensors import safe_open


def classifier(run_dir):
    with safe_open(str(run_dir / "classifier.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("views", ["2", "online"])
def test_a_copied_dataset_gives_identical_results(env, capsys, views):
    tmp, base, image_dir = env
    copy = tmp / "copy"
    shutil.copytree(image_dir.parent, copy)
    moved = [str(copy / "images") if a == str(image_dir) else a for a in base]
    moved = [str(copy / "split_zhou_Tiny.json") if a.endswith("split_zhou_Tiny.json") else a for a in moved]
    for name, args in (("a", base), ("b", moved)):
        code, _, err = run(
            [
                "train",
                *args,
                "--shots",
                "2",
                "--seed",
                "1",
                "--epochs",
                "4",
                "--views",
                views,
                "--out",
                str(tmp / name),
            ],
            capsys,
        )
        assert code == 0, err
    a, b = classifier(tmp / "a"), classifier(tmp / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_online_training_end_to_end(env, capsys):
    tmp, base, _ = env
    code, out, err = run(
        ["train", *base, "--shots", "2", "--seed", "1", "--epochs", "3", "--views", "online", "--out", str(tmp / "on")],
        capsys,
    )
    assert code == 0, err
    config = json.loads((tmp / "on" / "config.json").read_text())
    metrics = json.loads((tmp / "on" / "metrics.json").read_text())
    assert config["views"] == "online"
    assert metrics["train_encoder_passes"] == 3 * 6  # 3 epochs x 2 shots x 3 classes
    code, out, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "2",
            "--epochs",
            "3",
            "--views",
            "online",
            "--out",
            str(tmp / "on2"),
        ],
        capsys,
    )
    assert not torch.equal(
        classifier(tmp / "on")["text_feature_residuals"], classifier(tmp / "on2")["text_feature_residuals"]
    )


@pytest.mark.parametrize("method", ["tip-adapter", "linear-probe"])
def test_online_views_refused_for_methods_that_do_not_train_on_augmentations(env, capsys, method):
    tmp, base, _ = env
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "1",
            "--method",
            method,
            "--views",
            "online",
            "--out",
            str(tmp / "x"),
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    assert "--views online draws a fresh augmentation" in err and method in err
