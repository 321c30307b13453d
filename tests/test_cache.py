"""The feature cache (taskres.cache; docs/mutation.md), against computations written out here: the image key and the
namespace folder and its description hashed by hand, chunk sizes and metadata, round trips that are bit-exact and
misses for a changed image, view, transform or backbone, the exact messages (and ``param``) of the errors and warnings
a user sees, the pixel limit and the worker count reaching the decoder, view seeds taken from the image names
(expected crops from tests/test_images.py), the loader-worker policy, the progress bar, and a torchrun job's
collective encoding played in one process by a scripted ``Cluster`` (the other rank's part written out in each
test)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_pngs
from PIL import Image
from safetensors import safe_open
from test_images import rrc_flip, write_photo

import taskres.cache as cache_module
from taskres.backbones import load_backbone
from taskres.cache import FORMAT, FeatureCache, check_writable_dir
from taskres.cache_keys import image_key
from taskres.data.images import ImageViews, view_seed
from taskres.distributed import Cluster
from taskres.encoding import encode_batches, loader_workers
from taskres.errors import TaskResError, TaskResFileNotFoundError, TaskResValueError


def _test_namespace(tiny) -> dict:
    """The namespace of the test transform, as docs and cache.py describe it, written out field by field."""
    assert tiny.image_size == 32
    transform = {
        "size": 32,
        "mean": list(tiny.mean),
        "std": list(tiny.std),
        "interpolation": "bicubic",
        "kind": "test",
        "resize": "shorter_side",
        "crop": "center",
    }
    return {"format": FORMAT, "backbone": tiny.identity.weights_key(), "transform": transform}


def _ns_folder(root: Path, ns: dict) -> Path:
    return root / f"v{FORMAT}" / hashlib.sha256(json.dumps(ns, sort_keys=True).encode()).hexdigest()[:24]


def _chunks(folder: Path) -> list[tuple[dict, torch.Tensor]]:
    out = []
    for path in sorted(folder.rglob("chunk-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.append((f.metadata(), f.get_tensor("features")))
    return out


def _cache_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "taskres.cache"]


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# ---- keys, folders and their errors --------------------------------------------------------------------------------


def test_image_key_is_the_documented_hash(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"123456")
    digest = hashlib.sha256(b"123456").hexdigest()
    assert image_key(path) == digest[:32]  # the test transform: the bytes alone
    # a view, whose crop the name seeds: the bytes' digest and the name
    assert image_key(path, "train/a.png") == hashlib.sha256(f"{digest}|train/a.png".encode()).hexdigest()[:32]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert image_key(path) == digest[:32]  # a touched file keeps its key ...
    path.write_bytes(b"123457")
    assert image_key(path) == hashlib.sha256(b"123457").hexdigest()[:32]  # ... a changed byte is a new one
    with pytest.raises(TaskResError, match="does not exist"):
        image_key(tmp_path / "missing.png")


def test_a_missing_image_is_named_by_its_absolute_path_with_the_fix(tiny, tmp_path, monkeypatch):
    paths = write_pngs(tmp_path / "data" / "train", 1)
    missing = tmp_path / "data" / "train" / "gone.png"
    monkeypatch.chdir(tmp_path)  # the relative names do not lead to the files from here
    with pytest.raises(TaskResFileNotFoundError) as err:
        FeatureCache(None, quiet=True).features(tiny, [paths[0], missing], names=["train/0.png", "train/gone.png"])
    assert isinstance(err.value, FileNotFoundError)
    assert str(err.value) == (
        f"image {str(missing)!r} does not exist; check the data folder (--data/--root) and the split file's paths, "
        "which are relative to it."
    )


def test_an_unusable_cache_folder_is_named_as_the_user_gave_it_with_the_reason(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(TaskResValueError) as err:
        FeatureCache(blocker, quiet=True)
    assert err.value.param == "cache_dir"
    assert str(err.value) == (
        f"cache_dir {str(blocker)!r} is not a writable folder ({os.strerror(errno.ENOTDIR)}); choose another "
        "folder, or encode without the cache."
    )
    # called without `shown` (as for --out), the folder itself is named; an error without strerror gives its text
    bad = tmp_path / "out\x00dir"
    with pytest.raises(TaskResValueError) as err:
        check_writable_dir(bad, "out")
    assert err.value.param == "out"
    assert str(err.value) == (
        f"out {str(bad)!r} is not a writable folder (embedded null byte); choose another folder, or encode without "
        "the cache."
    )


def test_the_write_probe_goes_in_the_folder_itself_and_is_removed(tmp_path, monkeypatch):
    # a broken system temp folder must not make a writable cache folder look unwritable
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    check_writable_dir(tmp_path / "out" / "deep", "out")
    assert (tmp_path / "out" / "deep").is_dir() and list((tmp_path / "out" / "deep").iterdir()) == []
    FeatureCache(tmp_path / "cache", quiet=True)
    assert list((tmp_path / "cache" / f"v{FORMAT}").iterdir()) == []


def test_the_namespace_folder_and_its_description_are_the_documented_hash_and_json(tiny, tmp_path):
    paths = write_pngs(tmp_path / "img", 2)
    cache = FeatureCache(tmp_path / "c", quiet=True)
    cache.features(tiny, paths, view=1, names=["a.png", "b.png"], scale=(0.5, 1.0))
    cache.features(tiny, paths, names=["a.png", "b.png"])
    train = {
        **_test_namespace(tiny)["transform"],
        "kind": "train",
        "crop": "random_resized",
        "scale": [0.5, 1.0],
        "flip": 0.5,
        "view": 1,
    }
    del train["resize"]
    view_ns = {**_test_namespace(tiny), "transform": train}
    folders = [_ns_folder(tmp_path / "c", ns) for ns in (view_ns, _test_namespace(tiny))]
    assert sorted(p.name for p in (tmp_path / "c" / f"v{FORMAT}").iterdir()) == sorted(f.name for f in folders)
    for folder, ns in zip(folders, (view_ns, _test_namespace(tiny))):
        # sorted keys, one-space indent: the description an earlier version wrote for the same namespace
        assert (folder / "namespace.json").read_text() == json.dumps(ns, indent=1, sort_keys=True)
        assert len(list(folder.glob("chunk-*.safetensors"))) == 1


def test_a_cache_folder_removed_while_in_use_is_made_again(tiny, tmp_path):
    paths = write_pngs(tmp_path / "img", 2)
    cache = FeatureCache(tmp_path / "c", quiet=True)
    shutil.rmtree(tmp_path / "c")  # e.g. cleared between two runs of a notebook
    feats, _ = cache.features(tiny, paths)
    folder = _ns_folder(tmp_path / "c", _test_namespace(tiny))
    assert (folder / "namespace.json").is_file() and len(list(folder.glob("chunk-*.safetensors"))) == 1
    again, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths)
    assert torch.equal(again, feats)


def test_a_namespace_folder_that_cannot_be_made_is_named_with_the_reason(tiny, tmp_path):
    paths = write_pngs(tmp_path / "img", 1)
    cache = FeatureCache(tmp_path / "c", quiet=True)
    folder = _ns_folder(tmp_path / "c", _test_namespace(tiny))
    folder.write_text("a file in the way")
    with pytest.raises(TaskResValueError) as err:
        cache.features(tiny, paths)
    assert err.value.param == "cache_dir"
    assert str(err.value) == (
        f"cache_dir {str(tmp_path / 'c')!r}: {str(folder)!r} cannot be written ({os.strerror(errno.EEXIST)}); fix "
        "or remove it, or choose another cache folder."
    )


# ---- round trips, re-use and misses --------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_and_reused(tiny, images, tmp_path):
    plain, _ = FeatureCache(None, batch_size=3, quiet=True).features(tiny, images)
    cache = FeatureCache(tmp_path / "c", batch_size=3, quiet=True)
    first, _ = cache.features(tiny, images)
    assert cache.encoded == 7 and torch.equal(first, plain)
    again = FeatureCache(tmp_path / "c", quiet=True)
    second, _ = again.features(tiny, images[::-1])
    assert again.encoded == 0 and torch.equal(second, plain.flip(0))


def test_cache_namespaces_keep_transforms_apart_and_reuse_the_same(tiny, tmp_path):
    paths = write_pngs(tmp_path / "img")
    names = [p.name for p in paths]
    cache = FeatureCache(tmp_path / "cache", quiet=True, batch_size=3, chunk_size=2)
    assert cache.root == tmp_path / "cache" / f"v{FORMAT}"
    test, _ = cache.features(tiny, paths, names=names)
    assert cache.encoded == 4
    view0, _ = cache.features(tiny, paths, view=0, names=names)
    small, _ = cache.features(tiny, paths, view=0, names=names, scale=(0.5, 0.6))
    assert cache.encoded == 12 and not torch.allclose(test, view0) and not torch.allclose(view0, small)
    folders = sorted(p for p in cache.root.iterdir() if p.is_dir() and p.name != "index")
    assert len(folders) == 3
    described = [json.loads((f / "namespace.json").read_text()) for f in folders]
    assert all(d["format"] == FORMAT and d["backbone"] == tiny.identity.weights_key() for d in described)
    assert sorted(len(list(f.glob("chunk-*.safetensors"))) for f in folders) == [2, 2, 2]  # chunks of 2
    again = FeatureCache(tmp_path / "cache", quiet=True)
    for view, scale, expected in ((None, (0.08, 1.0), test), (0, (0.08, 1.0), view0), (0, (0.5, 0.6), small)):
        feats, skipped = again.features(
            tiny, list(reversed(paths)), view=view, names=list(reversed(names)), scale=scale
        )
        assert torch.equal(feats, expected.flip(0)) and skipped == []
    assert again.encoded == 0
    renamed, _ = again.features(tiny, paths, names=["x" + n for n in names])  # the test transform: bytes only
    assert again.encoded == 0 and torch.equal(renamed, test)
    renamed, _ = again.features(tiny, paths, view=0, names=["x" + n for n in names])  # a view: the name seeds it
    assert again.encoded == 4 and not torch.allclose(renamed, view0)
    no_cache = FeatureCache(None, quiet=True)
    torch.testing.assert_close(no_cache.features(tiny, paths, names=names)[0], test)
    assert no_cache.encoded == 4 and no_cache.root is None


def test_changed_image_view_or_backbone_is_a_miss(tiny, images, tmp_path, openai_vit_jit_file):
    cache = FeatureCache(tmp_path / "c", quiet=True)
    before, _ = cache.features(tiny, images)
    Image.new("RGB", (40, 40), (255, 0, 0)).save(images[2])
    cache.encoded = 0
    after, _ = cache.features(tiny, images)
    assert cache.encoded == 1
    assert not torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    cache.encoded = 0
    v0, _ = cache.features(tiny, images, view=0)
    v1, _ = cache.features(tiny, images, view=1)
    assert cache.encoded == 14 and not torch.equal(v0, v1) and not torch.equal(v0, after)
    v0_again, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, images, view=0)
    assert torch.equal(v0, v0_again)  # augmented views are reproducible
    other = FeatureCache(tmp_path / "c", quiet=True)
    other.features(load_backbone(str(openai_vit_jit_file)), images)
    assert other.encoded == 7


def test_cached_views_do_not_depend_on_where_the_dataset_lies(tiny, split_dataset, tmp_path):
    image_dir, _ = split_dataset
    copy = tmp_path / "elsewhere" / "images"
    shutil.copytree(image_dir, copy, copy_function=shutil.copy)  # new absolute paths, new modification times
    kept = tmp_path / "kept" / "images"
    shutil.copytree(image_dir, kept)  # as `cp -p`: modification times kept
    names = ["train/red_0.png", "train/blue_1.png"]
    feats = []
    for root, encoded in ((image_dir, 2), (copy, 0), (kept, 0)):
        cache = FeatureCache(tmp_path / "cache", quiet=True)
        f, _ = cache.features(tiny, [root / n for n in names], view=3, names=names)
        feats.append(f)
        assert cache.encoded == encoded  # the same bytes under the same name: the same key, wherever they lie
    assert torch.equal(feats[0], feats[1]) and torch.equal(feats[0], feats[2])
    other_view, _ = FeatureCache(None).features(tiny, [image_dir / n for n in names], view=4, names=names)
    assert not torch.allclose(other_view, feats[0])


def test_cached_views_are_seeded_by_the_image_name_not_its_place(tiny, tmp_path):
    (tmp_path / "a").mkdir()
    photo = write_photo(tmp_path / "a" / "cat.png", 50, 40, 3)
    copy = tmp_path / "b" / "cat.png"
    copy.parent.mkdir()
    shutil.copy2(photo, copy)
    names = ["train/cat.png", "train/dog.png"]  # the same pixels under two names
    feats, _ = FeatureCache(None, quiet=True).features(tiny, [photo, copy], view=2, names=names, scale=(0.3, 0.9))
    img = Image.open(photo).convert("RGB")
    pixels = torch.stack([rrc_flip(img, 32, view_seed(2, n), scale=(0.3, 0.9)) for n in names])
    torch.testing.assert_close(feats, tiny.encode_images(pixels).cpu(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])
    moved, _ = FeatureCache(None, quiet=True).features(tiny, [copy], view=2, names=names[:1], scale=(0.3, 0.9))
    torch.testing.assert_close(moved[0], feats[0])  # another place, the same name: the same crop


def test_interrupted_extraction_resumes(tiny, images, tmp_path):
    images[5].write_bytes(b"not an image")
    # chunks hold up to 1024 images: the four encoded before the error are flushed when it stops
    cache = FeatureCache(tmp_path / "c", batch_size=2, quiet=True)
    with pytest.raises(TaskResError, match=r"5.png' cannot be decoded"):
        cache.features(tiny, images)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(images[5])
    resumed = FeatureCache(tmp_path / "c", quiet=True)
    resumed.features(tiny, images)
    assert resumed.encoded == 3  # images 0-3 were kept from the interrupted run


# ---- chunks --------------------------------------------------------------------------------------------------------


def test_chunks_hold_chunk_size_images_with_their_keys_and_checksum(tiny, tmp_path):
    paths = write_pngs(tmp_path / "img", 7)
    names = [f"train/{p.name}" for p in paths]
    cache = FeatureCache(tmp_path / "c", quiet=True, batch_size=2, chunk_size=4, cluster=Cluster())
    feats, _ = cache.features(tiny, paths, names=names)
    keys = [image_key(p) for p in paths]
    chunks = sorted(_chunks(tmp_path / "c"), key=lambda c: len(c[1]), reverse=True)
    # flushed once 4 images are pending (after the 2nd batch of 2), the rest when the encoding ends
    assert [json.loads(meta["keys"]) for meta, _ in chunks] == [keys[:4], keys[4:]]
    for (meta, tensor), rows in zip(chunks, (feats[:4], feats[4:])):
        assert set(meta) == {"keys", "sha256"}  # one process (a Cluster of one): no rank recorded
        h = hashlib.sha256(meta["keys"].encode())
        h.update(tensor.numpy().tobytes())
        assert meta["sha256"] == h.hexdigest() and tensor.dtype == torch.float32 and torch.equal(tensor, rows)
    # a cluster of one process is alone, also without a cache folder
    assert FeatureCache(None, quiet=True, cluster=Cluster()).cluster is None


def test_default_batches_of_32_and_chunks_of_1024(tiny, tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)

    class CountingBackbone:
        def __init__(self, backbone):
            self.backbone, self.batches = backbone, []

        def __getattr__(self, name):
            return getattr(self.backbone, name)

        def encode_images(self, pixels):  # a stand-in encoder (32 pixel values): only the batching is under test
            self.batches.append(len(pixels))
            return pixels.flatten(1)[:, :32].float()

    counting = CountingBackbone(tiny)
    n = 1100  # one file under 1100 names: 1100 keys for a view (the names seed its crops)
    FeatureCache(tmp_path / "c", workers=0).features(counting, [path] * n, view=0, names=[f"n{i}" for i in range(n)])
    assert counting.batches == [32] * 34 + [12]
    assert sorted(len(t) for _, t in _chunks(tmp_path / "c")) == [76, 1024]
    counting.batches.clear()
    data = ImageViews([str(path)] * 40, tiny.image_size, tiny.mean, tiny.std)
    assert sum(len(idx) for idx, _, _ in encode_batches(counting, data, workers=0)) == 40
    assert counting.batches == [32, 8]  # encode_batches' own default


def test_corrupt_chunk_is_rebuilt_with_a_warning(tiny, images, tmp_path, caplog):
    cache = FeatureCache(tmp_path / "c", chunk_size=4, batch_size=4, quiet=True)
    good, _ = cache.features(tiny, images)
    chunks = sorted((tmp_path / "c").rglob("chunk-*.safetensors"))
    assert len(chunks) == 2
    data = chunks[0].read_bytes()
    chunks[0].write_bytes(data[: len(data) // 2])  # truncated
    fresh = FeatureCache(tmp_path / "c", quiet=True)
    with caplog.at_level(logging.WARNING):
        again, _ = fresh.features(tiny, images)
    assert "is corrupt" in caplog.text
    assert fresh.encoded in (3, 4) and torch.equal(again, good)


def test_a_corrupt_chunk_is_named_deleted_and_re_encoded(tiny, tmp_path, caplog):
    paths = write_pngs(tmp_path / "img", 3)
    good, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths)
    (chunk,) = (tmp_path / "c").rglob("chunk-*.safetensors")
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0x55  # in the last feature: the header still parses
    chunk.write_bytes(bytes(data))
    fresh = FeatureCache(tmp_path / "c", quiet=True)
    with caplog.at_level(logging.WARNING):
        again, _ = fresh.features(tiny, paths)
    assert _cache_logs(caplog) == [
        f"feature cache file {chunk} is corrupt (checksum mismatch); deleting it, its images will be re-encoded"
    ]
    assert not chunk.exists() and fresh.encoded == 3 and torch.equal(again, good)
    assert len(list((tmp_path / "c").rglob("chunk-*.safetensors"))) == 1


def test_a_chunk_another_rank_deleted_first_is_not_an_error(tiny, tmp_path, monkeypatch, caplog):
    # two ranks that find the same corrupt chunk both delete it: the second one finds it gone
    paths = write_pngs(tmp_path / "img", 2)
    good, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths)
    real_open = cache_module.safe_open

    def open_after_the_other_rank_deleted_it(path, framework):
        Path(path).unlink()
        return real_open(path, framework)

    monkeypatch.setattr(cache_module, "safe_open", open_after_the_other_rank_deleted_it)
    fresh = FeatureCache(tmp_path / "c", quiet=True)
    with caplog.at_level(logging.WARNING):
        again, _ = fresh.features(tiny, paths)
    assert fresh.encoded == 2 and torch.equal(again, good)
    assert len(_cache_logs(caplog)) == 1 and "is corrupt" in _cache_logs(caplog)[0]


# ---- decoding: skipped images, pixel limit, workers ----------------------------------------------------------------


def test_cache_duplicates_and_skipped_images(tiny, tmp_path):
    paths = write_pngs(tmp_path / "img", 3)
    cache = FeatureCache(tmp_path / "cache", quiet=True)
    feats, _ = cache.features(tiny, [paths[0], paths[1], paths[0]])
    assert cache.encoded == 2 and torch.equal(feats[0], feats[2])
    bad = tmp_path / "img" / "bad.png"
    bad.write_bytes(b"junk")
    feats, skipped = cache.features(tiny, [paths[2], bad, paths[0]], skip_bad=True)
    assert skipped == [str(bad)] and torch.equal(feats[1], torch.zeros(32)) and feats[0].abs().sum() > 0
    assert feats.shape == (3, 32)
    with pytest.raises(TaskResError, match="cannot be decoded"):
        FeatureCache(None, quiet=True).features(tiny, [paths[0], bad])
    assert FeatureCache(None).features(tiny, [])[0].shape == (0, 32)


def test_a_skipped_image_is_named_in_the_warning(tiny, tmp_path, caplog):
    paths = write_pngs(tmp_path / "img", 3)
    paths[1].write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        feats, skipped = FeatureCache(None, quiet=True).features(tiny, paths, skip_bad=True)
    assert skipped == [str(paths[1])] and torch.equal(feats[1], torch.zeros(32))
    assert _cache_logs(caplog) == [f"skipping undecodable image {paths[1]}"]


def test_the_pixel_limit_reaches_the_decoder(tiny, tmp_path):
    (path,) = write_pngs(tmp_path / "img", 1)  # 34 x 30 = 1020 pixels
    with pytest.raises(TaskResValueError, match=r"is 34 x 30 = 1020 pixels, more than the limit of 1019 "):
        FeatureCache(None, quiet=True, max_pixels=1019).features(tiny, [path])
    with pytest.raises(TaskResValueError, match="more than the limit of 1019"):
        FeatureCache(tmp_path / "c", quiet=True, max_pixels=1019).features(tiny, [path], view=0)
    feats, skipped = FeatureCache(None, quiet=True, max_pixels=1020).features(tiny, [path])
    assert skipped == [] and feats.abs().sum() > 0


class _WorkerTaggingViews(ImageViews):
    """ImageViews that report, as the item's error, that they were decoded in a worker process."""

    def __getitems__(self, keys):  # the DataLoader asks for whole batches
        info = torch.utils.data.get_worker_info()
        tag = f"decoded in worker {info.id}" if info is not None else ""
        return [(i, pixels, error or tag) for i, pixels, error in super().__getitems__(keys)]


def test_the_given_worker_count_is_used(tiny, tmp_path, monkeypatch):
    paths = [str(p) for p in write_pngs(tmp_path / "img", 2)]
    # two images in batches of 1: the automatic choice would decode them in this process
    assert loader_workers(None, 2, 1, torch.device("cpu")) == 0
    data = _WorkerTaggingViews(paths, tiny.image_size, tiny.mean, tiny.std)
    errors = [e for _, _, batch in encode_batches(tiny, data, batch_size=1, workers=1) for e in batch]
    assert errors == ["decoded in worker 0"] * 2
    assert [e for _, _, batch in encode_batches(tiny, data, batch_size=1, workers=0) for e in batch] == ["", ""]
    monkeypatch.setattr(cache_module, "ImageViews", _WorkerTaggingViews)
    with pytest.raises(TaskResValueError, match="^decoded in worker 0$"):
        FeatureCache(None, batch_size=1, workers=1, quiet=True).features(tiny, paths)


def test_bad_image_in_a_worker_process_keeps_its_message(tiny, images, tmp_path):
    images[3].write_bytes(b"garbage")
    with pytest.raises(TaskResError, match=r"^image '.*3.png' cannot be decoded"):
        FeatureCache(tmp_path / "c", workers=1, quiet=True).features(tiny, images)


def test_loader_workers_policy(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # the machine's CPUs ...
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)  # ... 4 for this process
    assert loader_workers(3, 10, 32, cpu) == 3 and loader_workers(0, 1000, 32, cuda) == 0  # given: as is
    assert loader_workers(None, 64, 32, cuda) == 0  # two batches or fewer: none
    assert loader_workers(None, 65, 32, cpu) == 1  # the CPU: one decodes ahead
    assert loader_workers(None, 65, 32, cuda) == 3  # a GPU: all the CPUs this process may use but one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert loader_workers(None, 10_000, 32, cuda) == 8  # at most 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert loader_workers(None, 65, 32, cuda) == 1 and loader_workers(None, 65, 32, cpu) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert loader_workers(None, 1000, 32, cuda) == 0 and loader_workers(None, 1000, 32, cpu) == 0  # one CPU: none
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: the machine's count
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert loader_workers(None, 65, 32, cuda) == 5 and loader_workers(None, 65, 32, cpu) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: one CPU
    assert loader_workers(None, 65, 32, cuda) == 0 and loader_workers(None, 65, 32, cpu) == 0


def test_encoding_on_the_cpu_asks_for_no_pinned_memory(tiny, tmp_path):
    paths = write_pngs(tmp_path / "img", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pinned memory without a GPU is a UserWarning
        feats, _ = FeatureCache(None, quiet=True).features(tiny, paths)
    assert feats.shape == (2, 32)


# ---- the progress bar ----------------------------------------------------------------------------------------------


def test_the_progress_bar_counts_images_under_its_label_and_is_cleared(tiny, tmp_path, capsys):
    paths = write_pngs(tmp_path / "img", 7)
    capsys.readouterr()
    FeatureCache(None, batch_size=3).features(tiny, paths, desc="train views")  # shown by default
    err = capsys.readouterr().err
    assert "train views:" in err and " 0/7 [" in err and "img/s]" in err
    assert err.endswith("\r") and err.rstrip("\r").split("\r")[-1].strip() == ""  # cleared at the end (leave=False)
    FeatureCache(None).features(tiny, paths[:2])
    assert "encoding:" in capsys.readouterr().err  # the default label
    FeatureCache(None, quiet=True).features(tiny, paths)
    data = ImageViews([str(p) for p in paths], tiny.image_size, tiny.mean, tiny.std)
    list(encode_batches(tiny, data))  # quiet unless asked (the online views encode every epoch)
    assert capsys.readouterr().err == ""
    list(encode_batches(tiny, data, quiet=False))
    assert "encoding:" in capsys.readouterr().err


# ---- torchrun: a job's ranks played in one process -----------------------------------------------------------------


@dataclass(frozen=True)
class ScriptedCluster(Cluster):
    """Rank ``rank`` of a ``world_size``-rank torchrun job in one process: ``others[what](value)`` plays the other
    ranks of the collective ``what`` and returns every rank's value in rank order (default: all hold ``value``);
    ``barriers[what]()`` plays what they do before they reach the barrier ``what``."""

    others: dict = field(default_factory=dict, compare=False)
    barriers: dict = field(default_factory=dict, compare=False)
    log: list = field(default_factory=list, compare=False)

    def gather(self, value, what):
        self.log.append(what)
        play = self.others.get(what)
        return play(value) if play is not None else [value] * self.world_size

    def barrier(self, what):
        self.log.append(what)
        if what in self.barriers:
            self.barriers[what]()


def _digest(value) -> str:
    """What ``Cluster.agree`` compares between ranks."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@pytest.fixture()
def job(tiny, tmp_path):
    """Five images; image 0 was cached by an earlier run, in a chunk whose name sorts first."""
    paths = write_pngs(tmp_path / "img", 5)
    names = [f"train/{p.name}" for p in paths]
    FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths[:1], names=names[:1])
    (first,) = (tmp_path / "c").rglob("chunk-*.safetensors")
    first.rename(first.with_name("chunk-0.safetensors"))
    keys = [image_key(p) for p in paths]
    return paths, names, keys


def test_two_ranks_share_the_missing_images_and_read_each_others_chunks(tiny, tmp_path, job):
    paths, names, _ = job
    paths[4].write_bytes(b"not a png")  # in rank 1's share: skipped on both ranks
    keys = [image_key(p) for p in paths]
    expected, _ = FeatureCache(None, quiet=True).features(tiny, paths, names=names, skip_bad=True)
    agreed = _digest([_test_namespace(tiny), keys[1:]])  # rank 1 holds the same namespace and missing images

    def rank_1_encodes(bad):  # rank 1's share of the missing 1-4: images 2 and 4
        FeatureCache(tmp_path / "c", quiet=True).features(
            tiny, [paths[2], paths[4]], names=[names[2], names[4]], skip_bad=True
        )
        return [bad, [keys[4]]]

    what = ("the images still to encode (train)", "encoding train")
    cluster = ScriptedCluster(0, 2, others={what[0]: lambda d: [d, agreed], what[1]: rank_1_encodes})
    cache = FeatureCache(tmp_path / "c", quiet=True, cluster=cluster)
    feats, skipped = cache.features(tiny, paths, names=names, desc="train", skip_bad=True)
    torch.testing.assert_close(feats, expected)  # encoded in other batches: equal up to rounding
    assert skipped == [str(paths[4])] and torch.equal(feats[4], torch.zeros(32))
    assert cache.encoded == 2  # images 1 and 3
    assert cluster.log == ["checking the cache folder"] * 3 + ["hashing the images (train)", *what]
    own = [meta for meta, _ in _chunks(tmp_path / "c") if "rank" in meta]
    assert [(m["rank"], json.loads(m["keys"])) for m in own] == [("0/2", [keys[1], keys[3]])]


def test_a_rank_with_nothing_to_encode_waits_and_reads_the_others(tiny, tmp_path, job):
    paths, names, keys = job
    root = tmp_path / "c" / f"v{FORMAT}"

    def rank_0_probes(value):  # rank 0 writes a probe file; every rank sees it
        if isinstance(value, bool):
            return [True, value]
        (root / ".shared-probe-0").write_text("taskres")
        return [".shared-probe-0", value]

    def rank_0_encodes(bad):  # one image missing: rank 0's share, none for rank 1
        FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths[1:2], names=names[1:2])
        return [[], bad]

    cluster = ScriptedCluster(1, 2, others={"checking the cache folder": rank_0_probes, "encoding x": rank_0_encodes})
    cache = FeatureCache(tmp_path / "c", quiet=True, cluster=cluster)
    feats, skipped = cache.features(tiny, paths[:2], names=names[:2], desc="x")
    expected, _ = FeatureCache(None, quiet=True).features(tiny, paths[:2], names=names[:2])
    torch.testing.assert_close(feats, expected)  # encoded in batches of 1 there: equal up to rounding
    assert skipped == [] and cache.encoded == 0


def test_a_rank_that_cannot_see_the_others_chunks_stops_and_keeps_its_own(tiny, tmp_path, job):
    paths, names, keys = job
    agreed = _digest([_test_namespace(tiny), keys[1:]])
    what = ("the images still to encode (train)", "encoding train")
    # rank 1 encodes images 2 and 4 into a folder that rank 0 does not see
    cluster = ScriptedCluster(0, 2, others={what[0]: lambda d: [d, agreed], what[1]: lambda bad: [bad, []]})
    cache = FeatureCache(tmp_path / "c", quiet=True, cluster=cluster)
    with pytest.raises(TaskResValueError) as err:
        cache.features(tiny, paths, names=names, desc="train")
    assert err.value.param == "cache_dir"
    folder = _ns_folder(tmp_path / "c", _test_namespace(tiny))
    assert str(err.value) == (
        f"rank 0 cannot see the features the other ranks wrote to {str(folder)!r} (e.g. for {str(paths[2])!r}); "
        "the cache folder must be one folder that every node of the job mounts (--cache-dir). Finished chunks are "
        "kept; fix the folder and run again."
    )
    alone = FeatureCache(tmp_path / "c", quiet=True)
    alone.features(tiny, paths, names=names)
    assert alone.encoded == 2  # images 2 and 4; 0, 1 and 3 were kept


def test_ranks_that_disagree_on_the_missing_images_stop(tiny, tmp_path, job):
    paths, names, keys = job
    other = _digest([_test_namespace(tiny), keys[2:]])  # rank 1 sees image 1 as cached already
    cluster = ScriptedCluster(0, 2, others={"the images still to encode (val)": lambda d: [d, other]})
    with pytest.raises(TaskResValueError) as err:
        FeatureCache(tmp_path / "c", quiet=True, cluster=cluster).features(tiny, paths, names=names, desc="val")
    assert str(err.value) == (
        "the ranks of this torchrun job disagree on the images still to encode (val) (ranks [0]; ranks [1] differ): "
        "every rank must run the same command on the same dataset files and see the same cache folder (--cache-dir)."
    )


def test_a_torchrun_job_needs_a_cache_folder_every_rank_sees(tmp_path):
    with pytest.raises(TaskResValueError) as err:
        FeatureCache(None, cluster=ScriptedCluster(0, 2))
    assert err.value.param == "cache_dir"
    assert str(err.value) == (
        "the ranks of a torchrun job exchange features through the cache folder; give one that every rank sees "
        "(--cache-dir), not --no-cache."
    )

    def rank_1_is_blind(value):
        return [value, False] if isinstance(value, bool) else [value, value]

    cluster = ScriptedCluster(0, 2, others={"checking the cache folder": rank_1_is_blind})
    with pytest.raises(TaskResValueError) as err:
        FeatureCache(tmp_path / "c", quiet=True, cluster=cluster)
    root = tmp_path / "c" / f"v{FORMAT}"
    assert err.value.param == "cache_dir"
    assert str(err.value) == (
        f"cache_dir {str(root)!r} is not shared between the nodes of this torchrun job: rank(s) [1] cannot see a "
        "file that rank 0 wrote there. The ranks exchange features through this folder; pass a folder on a "
        "filesystem that every node mounts at the same path."
    )
    assert list(root.iterdir()) == []  # the probe is removed
