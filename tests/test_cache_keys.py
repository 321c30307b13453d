"""The feature cache's keys (taskres.cache_keys; issue 27): file names that are not UTF-8 work with and without the
cache; features are keyed by the bytes of the files, so that datasets alike in names, sizes and times but not in
pixels do not share features and a copied dataset still hits; the index of file identities spares reading unchanged
files and is safe against damage and concurrent writers; a cache folder that can be read but not written serves what
it holds."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import COLOURS, write_pngs
from conftest import run_cli as run
from PIL import Image
from safetensors.torch import load_file

import taskres.cache_keys as cache_keys
from taskres.cache import FORMAT, FeatureCache
from taskres.cache_keys import feature_key, file_digest, image_key

LATIN1 = b"\xe9"  # 'e' acute in Latin-1: not valid UTF-8 on its own


def _solid(colour, rng, size=36) -> Image.Image:
    base = np.array(colour, dtype=np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8))


def _latin1_image_folder(root) -> str:
    """An ImageFolder whose class folders and image files are named with the byte 0xE9, as old tools wrote them;
    returns its path (str, the name Python gives it)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls, colour in ((b"caf" + LATIN1, COLOURS["red"]), (b"th" + LATIN1, COLOURS["blue"])):
            folder = os.path.join(os.fsencode(root), split.encode(), cls)
            os.makedirs(folder)
            for i in range(n):
                _solid(colour, rng).save(os.fsdecode(os.path.join(folder, b"%s-%d.png" % (LATIN1, i))))
    return str(root)


def _latin1_split_dataset(root) -> tuple[str, str]:
    """The same images as a CoOp split file: paths with the byte 0xE9 (JSON's "\\udce9", as json.dumps writes a
    name that os.fsdecode gave)."""
    folder = _latin1_image_folder(root / "images")
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for split in ("train", "test"):
        for label, cls in enumerate(sorted(os.listdir(os.path.join(folder, split)))):
            for name in sorted(os.listdir(os.path.join(folder, split, cls))):
                splits[split].append([f"{split}/{cls}/{name}", label, cls])
    splits["val"] = splits["train"][:2]
    (root / "split.json").write_text(json.dumps(splits))
    return folder, str(root / "split.json")


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ---- item 5: file names that are not UTF-8 -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["image_folder", "split_file"])
def test_file_names_that_are_not_utf8_work_with_and_without_the_cache(tmp_path, openai_rn_file, capsys, layout):
    if layout == "image_folder":
        data = ["--data", _latin1_image_folder(tmp_path / "data")]
    else:
        folder, split = _latin1_split_dataset(tmp_path / "data")
        data = ["--data", folder, "--split-file", split]
    common = [*data, "--backbone", str(openai_rn_file), "--quiet", "--device", "cpu"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    accuracy = {}
    for tag, where in (("cold", cache), ("warm", cache), ("none", ["--no-cache"])):
        code, _, err = run(["zeroshot", *common, *where, "--out", str(tmp_path / f"zs-{tag}")], capsys)
        assert code == 0 and "Traceback" not in err, err
        accuracy[tag] = _metrics(tmp_path / f"zs-{tag}")["accuracy"]
    assert accuracy["cold"] == accuracy["warm"] == accuracy["none"]
    train = ["train", *common, "--shots", "2", "--seed", "1", "--epochs", "2", "--views", "2"]
    for tag, where in (("cache", cache), ("none", ["--no-cache"])):  # augmented views: crops seeded by the names
        code, _, err = run([*train, *where, "--out", str(tmp_path / f"tr-{tag}")], capsys)
        assert code == 0 and "Traceback" not in err, err
    assert _metrics(tmp_path / "tr-cache")["accuracy"] == _metrics(tmp_path / "tr-none")["accuracy"]
    shots = (tmp_path / "tr-cache" / "fewshot_split.json").read_text()
    assert "caf\\udce9" in shots  # JSON's escape of the name as Python holds it: the original bytes come back


def test_a_view_of_a_non_utf8_name_is_seeded_by_its_bytes(tiny, tmp_path):
    (path,) = write_pngs(tmp_path / "img", 1)
    name = os.fsdecode(b"train/caf" + LATIN1 + b".png")
    feats, _ = FeatureCache(None, quiet=True).features(tiny, [path], view=1, names=[name])
    cached, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, [path], view=1, names=[name])
    assert torch.equal(feats, cached)
    digest = file_digest(path)
    assert image_key(path, name) == feature_key(digest, name) != feature_key(digest, "train/cafe.png")


# ---- item 10: keyed by content --------------------------------------------------------------------------------------


def _bmp_folder(root, swap: bool, times_ns: int) -> None:
    """A two-class ImageFolder of BMPs (every file the same size); ``swap``: each class folder holds the other
    class's pixels under the same names. Every file's times set to ``times_ns``."""
    rng = np.random.default_rng(3)
    for split, n in (("train", 2), ("test", 3)):
        images = {cls: [_solid(COLOURS[cls], rng) for _ in range(n)] for cls in ("red", "blue")}
        for cls in ("red", "blue"):
            (root / split / cls).mkdir(parents=True)
            pixels = images[{"red": "blue", "blue": "red"}[cls] if swap else cls]
            for i, img in enumerate(pixels):
                img.save(root / split / cls / f"{i}.bmp")
                os.utime(root / split / cls / f"{i}.bmp", ns=(times_ns, times_ns))


def test_datasets_alike_but_for_their_pixels_do_not_share_features(tmp_path, openai_rn_file, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _bmp_folder(a, swap=False, times_ns=1_600_000_000 * 10**9)
    _bmp_folder(b, swap=True, times_ns=1_600_000_000 * 10**9)
    files = {root: sorted(root.rglob("*.bmp")) for root in (a, b)}
    assert [p.relative_to(a) for p in files[a]] == [p.relative_to(b) for p in files[b]]
    assert {(p.stat().st_size, p.stat().st_mtime_ns) for p in files[a] + files[b]} == {
        (files[a][0].stat().st_size, 1_600_000_000 * 10**9)
    }
    common = ["--backbone", str(openai_rn_file), "--quiet", "--device", "cpu", "--shots", "2", "--seed", "1"]
    common += ["--epochs", "5", "--views", "0"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for data, tag, where in ((a, "a", cache), (b, "b", cache), (b, "b-none", ["--no-cache"])):
        code, _, err = run(
            ["train", "--data", str(data), *common, *where, "--out", str(tmp_path / "runs" / tag)], capsys
        )
        assert code == 0, err
    runs = {tag: load_file(tmp_path / "runs" / tag / "classifier.safetensors") for tag in ("a", "b", "b-none")}
    assert not torch.equal(
        runs["a"]["text_feature_residuals"], runs["b-none"]["text_feature_residuals"]
    )  # the pixels differ: so do the runs
    for name, tensor in runs["b-none"].items():  # B through the cache that A filled: B's own features
        assert torch.equal(runs["b"][name], tensor), name
    assert _metrics(tmp_path / "runs" / "b")["accuracy"] == _metrics(tmp_path / "runs" / "b-none")["accuracy"]


def test_the_features_of_a_file_follow_its_bytes_not_its_name_size_or_times(tiny, tmp_path):
    rng = np.random.default_rng(0)
    paths = [tmp_path / f"{i}.bmp" for i in range(3)]
    for path in paths:
        _solid((100, 100, 100), rng).save(path)
    names = [p.name for p in paths]
    before, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths, names=names)
    st, data = paths[0].stat(), paths[0].read_bytes()
    paths[0].write_bytes(paths[1].read_bytes())  # the pixels of image 1, the same size ...
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the times of image 0
    again = FeatureCache(tmp_path / "c", quiet=True)
    after, _ = again.features(tiny, paths, names=names)
    assert again.encoded == 0 and torch.equal(after[0], before[1])  # image 1's features, cached under its bytes
    paths[0].write_bytes(data)
    restored, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths[:1])
    assert torch.equal(restored[0], before[0])


def test_a_copied_dataset_hits_the_cache_after_one_hashing_pass(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_keys, "SETTLE_NS", 0)  # the files are fresh: record them at once
    paths = write_pngs(tmp_path / "a", 5)
    names = [p.name for p in paths]
    first = FeatureCache(tmp_path / "c", quiet=True)
    feats, _ = first.features(tiny, paths, view=2, names=names)
    assert (first.encoded, first.hashed) == (5, 5)
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy)  # new places, new times
    copied = [tmp_path / "b" / n for n in names]
    for hashed in (5, 0):  # read once, then known by the index
        cache = FeatureCache(tmp_path / "c", quiet=True)
        again, _ = cache.features(tiny, copied, view=2, names=names)
        assert (cache.encoded, cache.hashed) == (0, hashed) and torch.equal(again, feats)


def test_an_old_format_cache_is_ignored_and_left_in_place(tiny, tmp_path):
    assert FORMAT == 4
    old = tmp_path / "c" / "v3" / "0123456789abcdef01234567"
    old.mkdir(parents=True)
    (old / "chunk-0.safetensors").write_bytes(b"an earlier format's chunk")
    paths = write_pngs(tmp_path / "img", 2)
    cache = FeatureCache(tmp_path / "c", quiet=True)
    cache.features(tiny, paths)
    assert cache.encoded == 2 and (old / "chunk-0.safetensors").read_bytes() == b"an earlier format's chunk"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["v3", "v4"]
