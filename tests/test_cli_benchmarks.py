"""Benchmarks through the CLI: --dataset/--root, `taskres datasets`, and domain generalisation in `eval`."""

import json

import torch
from safetensors import safe_open
from test_benchmarks import A_WNIDS, WNIDS, make_imagenet, make_variant

from taskres.app.cli import main


def test_imagenet_run_evaluated_on_a_variant(tmp_path, openai_rn_file, capsys):
    root = tmp_path / "data"
    make_imagenet(root)
    make_variant(root, "imagenet_a")
    common = ["--backbone", str(openai_rn_file), "--cache-dir", str(tmp_path / "c"), "--quiet", "--device", "cpu"]
    assert (
        main(
            [
                "train",
                "--dataset",
                "imagenet",
                "--root",
                str(root),
                *common,
                "--shots",
                "2",
                "--seed",
                "1",
                "--epochs",
                "3",
                "--views",
                "0",
                "--lr",
                "2e-4",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"]["kind"] == "benchmark" and len(config["dataset"]["templates"]) == 8
    assert json.loads((tmp_path / "run" / "fewshot_split.json").read_text())["val"] == []

    assert (
        main(
            [
                "eval",
                "--run",
                str(tmp_path / "run"),
                "--dataset",
                "imagenet_a",
                "--root",
                str(root),
                "--cache-dir",
                str(tmp_path / "c"),
                "--quiet",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["dataset"] == "imagenet_a" and len(metrics["per_class_accuracy"]) == len(A_WNIDS)

    # The same numbers from the kept rows by hand: rows of A's wnids in the ImageNet classifier.
    from taskres.backbones import load_backbone
    from taskres.cache import FeatureCache
    from taskres.data.benchmarks import load_benchmark
    from taskres.methods.base import cosine_logits as zero_shot_logits

    with safe_open(str(tmp_path / "run" / "classifier.safetensors"), "pt") as f:
        t = f.get_tensor("base_text_features") + 0.5 * f.get_tensor("text_feature_residuals")
        scale = float(f.metadata()["logit_scale"])
    rows = [WNIDS.index(w) for w in A_WNIDS]
    ds = load_benchmark("imagenet_a", root)
    feats, _ = FeatureCache(None, quiet=True).features(
        load_backbone(str(openai_rn_file)), [ds.path(e) for e in ds.test]
    )
    pred = zero_shot_logits(feats, t[rows], scale).argmax(1)
    labels = torch.tensor([e.label for e in ds.test])
    assert metrics["n_correct"] == int((pred == labels).sum())

    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--dataset",
                "imagenet_a",
                "--root",
                str(root),
                *common,
                "--shots",
                "1",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "no training split" in capsys.readouterr().err


def test_datasets_listing(tmp_path, capsys):
    make_imagenet(tmp_path)
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "imagenet         ready" in out and "oxford_pets      missing" in out
    assert "1 of 15 datasets ready" in out


def test_unknown_dataset_and_missing_root(tmp_path, openai_rn_file, capsys):
    assert (
        main(
            [
                "zeroshot",
                "--dataset",
                "oxford_pet",
                "--root",
                str(tmp_path),
                "--backbone",
                str(openai_rn_file),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "did you mean 'oxford_pets'" in capsys.readouterr().err
    assert (
        main(["zeroshot", "--dataset", "oxford_pets", "--backbone", str(openai_rn_file), "--out", str(tmp_path / "r")])
        == 2
    )
    assert "needs --root" in capsys.readouterr().err
