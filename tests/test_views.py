"""Training views: the online protocol draws fresh, seeded augmentations every epoch; cached views depend on the data
(paths relative to the image folder), not on where it lies; the run's seed picks each epoch's view."""

import json
import shutil

import pytest
import torch
from conftest import run_cli as run
from safetensors import safe_open

from taskres.backbones import load_backbone
from taskres.cache import FeatureCache
from taskres.views import OnlineViews, ViewBank


@pytest.fixture()
def tiny(openai_rn_file):
    return load_backbone(str(openai_rn_file))


def online(tiny, image_dir, seed):
    names = [f"train/{c}_{i}.png" for i in range(3) for c in ("red", "green", "blue")]
    return OnlineViews(tiny, [str(image_dir / n) for n in names], names, seed)


def test_online_views_differ_every_epoch_and_repeat_for_the_same_seed(tiny, split_dataset):
    image_dir, _ = split_dataset
    a = online(tiny, image_dir, seed=1)
    e0, e1 = a.epoch(0), a.epoch(1)
    assert e0.shape == (9, 32) and not torch.allclose(e0, e1)
    assert torch.equal(online(tiny, image_dir, seed=1).epoch(1), e1)
    assert not torch.allclose(online(tiny, image_dir, seed=2).epoch(0), e0)
    assert a.encoded == 18
    bank = a.bank(3)
    assert bank.shape == (3, 9, 32) and not torch.allclose(bank[0], e0)  # a stream apart from the epochs'


def test_cached_views_do_not_depend_on_where_the_dataset_lies(tiny, split_dataset, tmp_path):
    image_dir, _ = split_dataset
    copy = tmp_path / "elsewhere" / "images"
    shutil.copytree(image_dir, copy, copy_function=shutil.copy)  # new absolute paths, new modification times
    kept = tmp_path / "kept" / "images"
    shutil.copytree(image_dir, kept)  # as `cp -p`: modification times kept
    names = ["train/red_0.png", "train/blue_1.png"]
    feats = []
    for root, encoded in ((image_dir, 2), (copy, 2), (kept, 0)):
        cache = FeatureCache(tmp_path / "cache", quiet=True)
        f, _ = cache.features(tiny, [root / n for n in names], view=3, names=names)
        feats.append(f)
        assert cache.encoded == encoded  # a new file identity is encoded again (to the same features)
    assert torch.equal(feats[0], feats[1]) and torch.equal(feats[0], feats[2])
    other_view, _ = FeatureCache(None).features(tiny, [image_dir / n for n in names], view=4, names=names)
    assert not torch.allclose(other_view, feats[0])


def test_view_bank_draws_each_epochs_view_with_the_seed():
    bank = torch.arange(3 * 5).float().reshape(3, 5, 1)  # view v of image i holds 5 * v + i
    a, b = ViewBank(bank, seed=1), ViewBank(bank, seed=2)
    seq_a = torch.stack([a.epoch(e)[:, 0] for e in range(6)])
    seq_b = torch.stack([b.epoch(e)[:, 0] for e in range(6)])
    views_a = (seq_a // 5).long()
    assert torch.equal(seq_a % 5, torch.arange(5).float().expand(6, 5))  # every image, every epoch
    assert all(sorted(views_a[:3, i].tolist()) == [0, 1, 2] for i in range(5))
    assert not torch.equal(seq_a, seq_b)
    assert torch.equal(ViewBank(bank[:1], seed=1).epoch(7), bank[0])
    # a bank that is not contiguous in memory (views of a larger tensor) reads the same rows
    strided = torch.arange(5 * 3).float().reshape(5, 3, 1).transpose(0, 1)  # view v of image i holds 3 * i + v
    c = ViewBank(strided, seed=1)
    assert not strided.is_contiguous()
    for e in range(6):
        assert torch.equal(c.epoch(e)[:, 0], 3 * torch.arange(5).float() + c.view_index(e))


def test_a_non_contiguous_bank_draws_the_same_rows_as_its_contiguous_copy():
    wide = torch.randn(3, 7, 10, generator=torch.Generator().manual_seed(6))
    views = wide[:, :, ::2]  # (3, 7, 5), not contiguous
    assert not views.is_contiguous()
    strided, dense = ViewBank(views, seed=9), ViewBank(views.contiguous(), seed=9)
    for epoch in range(7):
        assert torch.equal(strided.epoch(epoch), dense.epoch(epoch))


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
