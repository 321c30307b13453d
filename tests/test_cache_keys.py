"""The feature cache's keys (taskres.cache_keys; issue 27): file names that are not UTF-8 work with and without the
cache; features are keyed by the bytes of the files, so that datasets alike in names, sizes and times but not in
pixels do not share features and a copied dataset still hits; the index of file identities spares reading unchanged
files and is safe against damage and concurrent writers; a cache folder that can be read but not written serves what
it holds."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLOURS, write_pngs
from conftest import run_cli as run
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_cache import ScriptedCluster

import taskres.cache_keys as cache_keys
from taskres.cache import FORMAT, FeatureCache
from taskres.cache_keys import DigestIndex, feature_key, file_digest, image_key
from taskres.errors import TaskResValueError

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


# ---- the index of file identities ----------------------------------------------------------------------------------


@pytest.fixture()
def settled(monkeypatch):
    """Files count as settled at once (the tests' files are fresh), so that the index records them."""
    monkeypatch.setattr(cache_keys, "SETTLE_NS", 0)


def _index_files(cache_dir) -> list:
    return sorted((cache_dir / f"v{FORMAT}" / "index").glob("digests-*.json"))


def _cache_keys_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "taskres.cache_keys"]


def test_unchanged_files_are_read_once_and_a_rewritten_file_again(tiny, tmp_path, settled):
    paths = write_pngs(tmp_path / "img", 3)
    first = FeatureCache(tmp_path / "c", quiet=True)
    feats, _ = first.features(tiny, paths)
    first.features(tiny, paths, view=0)  # another namespace, the same files: known to this object
    assert first.hashed == 3 and len(_index_files(tmp_path / "c")) == 1
    index = json.loads(_index_files(tmp_path / "c")[0].read_text())
    st = paths[0].stat()
    assert index["entries"][str(paths[0])] == [
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        hashlib.sha256(paths[0].read_bytes()).hexdigest(),
    ]
    assert index["sha256"] == hashlib.sha256(json.dumps(index["entries"], sort_keys=True).encode()).hexdigest()
    second = FeatureCache(tmp_path / "c", quiet=True)
    assert torch.equal(second.features(tiny, paths)[0], feats) and (second.hashed, second.encoded) == (0, 0)
    paths[1].write_bytes(paths[1].read_bytes())  # the same bytes written again: a new identity, the same key
    third = FeatureCache(tmp_path / "c", quiet=True)
    assert torch.equal(third.features(tiny, paths)[0], feats) and (third.hashed, third.encoded) == (1, 0)


def test_a_file_changed_just_before_it_was_hashed_is_not_recorded(tiny, tmp_path):
    # a second write within the same clock tick would leave the identity as it was: such a file is read every time
    paths = write_pngs(tmp_path / "img", 2)
    old = 1_600_000_000 * 10**9
    os.utime(paths[0], ns=(old, old))  # an old modification time; its change time is now
    for _ in range(2):
        cache = FeatureCache(tmp_path / "c", quiet=True)
        cache.features(tiny, paths)
        assert cache.hashed == 2
    assert _index_files(tmp_path / "c") == []


@pytest.mark.parametrize("damage", ["truncated", "checksum", "not_a_dict", "bad_entry", "folder"])
def test_a_damaged_index_file_is_a_miss_never_a_wrong_hit(tiny, tmp_path, settled, caplog, damage):
    paths = write_pngs(tmp_path / "img", 2)
    feats, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths)
    (path,) = _index_files(tmp_path / "c")
    data = json.loads(path.read_text())
    wrong = hashlib.sha256(b"another image").hexdigest()
    if damage == "truncated":
        path.write_text(path.read_text()[:-20])
    elif damage == "checksum":  # another image's digest for image 0: a wrong hit, if it were believed
        data["entries"][str(paths[0])][5] = wrong
        path.write_text(json.dumps(data))
    elif damage == "not_a_dict":
        path.write_text("[]")
    elif damage == "bad_entry":  # well formed, its checksum right, an entry that is not one
        entries = {str(paths[0]): ["not", "an", "identity"]}
        path.write_text(json.dumps({"entries": entries, "sha256": cache_keys._checksum(entries)}))
    else:
        path.unlink()
        path.mkdir()
    cache = FeatureCache(tmp_path / "c", quiet=True)
    with caplog.at_level(logging.WARNING):
        again, _ = cache.features(tiny, paths)
    assert torch.equal(again, feats) and (cache.hashed, cache.encoded) == (2, 0)
    (message,) = _cache_keys_logs(caplog)
    assert message.startswith(f"feature cache index file {path} is damaged (")
    assert message.endswith("); ignoring it, its images will be hashed again")
    assert path.is_dir() if damage == "folder" else not path.exists()  # deleted; a folder is the user's
    assert len(_index_files(tmp_path / "c")) == (2 if damage == "folder" else 1)  # the new one


def test_concurrent_writers_each_write_their_own_index_file_and_readers_merge_them(
    tiny, tmp_path, settled, monkeypatch
):
    monkeypatch.setattr(cache_keys, "MAX_FILES", 2)
    paths = write_pngs(tmp_path / "img", 3)
    writers = [FeatureCache(tmp_path / "c", quiet=True) for _ in paths]
    for writer in writers:
        writer.features(tiny, [])  # each has read the (empty) index before any other writes
    for writer, path in zip(writers, paths):
        writer.features(tiny, [path])
    assert len(_index_files(tmp_path / "c")) == 3  # nobody overwrote anybody's entries
    reader = FeatureCache(tmp_path / "c", quiet=True)
    reader.features(tiny, paths)
    assert reader.hashed == 0
    (merged,) = _index_files(tmp_path / "c")  # more than MAX_FILES: merged into one, the merged ones deleted
    assert sorted(json.loads(merged.read_text())["entries"]) == sorted(str(p) for p in paths)
    late = FeatureCache(tmp_path / "c", quiet=True)
    late.features(tiny, paths)
    assert late.hashed == 0


def test_an_index_file_merged_away_while_it_is_read_is_no_warning(tiny, tmp_path, settled, monkeypatch, caplog):
    paths = write_pngs(tmp_path / "img", 2)
    FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths)
    real = Path.read_text

    def merged_by_another_process_first(self, *args, **kwargs):
        if self.name.startswith("digests-"):
            self.unlink()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", merged_by_another_process_first)
    cache = FeatureCache(tmp_path / "c", quiet=True)
    with caplog.at_level(logging.WARNING):
        cache.features(tiny, paths)
    assert cache.hashed == 2 and _cache_keys_logs(caplog) == []


def test_an_index_that_cannot_be_written_is_a_warning_and_changes_no_result(tiny, tmp_path, settled, caplog):
    paths = write_pngs(tmp_path / "img", 2)
    (tmp_path / "c" / f"v{FORMAT}").mkdir(parents=True)
    (tmp_path / "c" / f"v{FORMAT}" / "index").write_text("a file in the way")
    expected, _ = FeatureCache(None, quiet=True).features(tiny, paths)
    cache = FeatureCache(tmp_path / "c", quiet=True)
    with caplog.at_level(logging.WARNING):
        feats, _ = cache.features(tiny, paths)
    assert torch.equal(feats, expected)
    index = tmp_path / "c" / f"v{FORMAT}" / "index"
    assert _cache_keys_logs(caplog) == [
        f"cannot write the feature cache index {index} ({os.strerror(errno.EEXIST)}); the images will be hashed "
        "again next time"
    ]
    again = FeatureCache(tmp_path / "c", quiet=True)
    assert torch.equal(again.features(tiny, paths)[0], expected) and (again.hashed, again.encoded) == (2, 0)


def test_a_file_that_cannot_be_hashed_is_left_to_the_decoder_and_not_cached(tiny, tmp_path):
    (good,) = write_pngs(tmp_path / "img", 1)
    folder = tmp_path / "img" / "a-folder.png"
    folder.mkdir()
    with pytest.raises(TaskResValueError, match="is a folder, not an image file"):
        FeatureCache(tmp_path / "c", quiet=True).features(tiny, [good, folder])
    feats, skipped = FeatureCache(tmp_path / "c", quiet=True).features(tiny, [good, folder], skip_bad=True)
    assert skipped == [str(folder)] and torch.equal(feats[1], torch.zeros(32))
    keys = []
    for chunk in sorted((tmp_path / "c").rglob("chunk-*.safetensors")):
        with safe_open(str(chunk), "pt") as f:
            keys.append(json.loads(f.metadata()["keys"]))
    assert keys == [[image_key(good)]]  # the folder's key of place is never written


def test_the_ranks_of_a_job_share_the_hashing(tiny, tmp_path, monkeypatch):
    paths = write_pngs(tmp_path / "img", 5)
    expected, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths)  # cached; files too fresh to index
    monkeypatch.setattr(cache_keys, "SETTLE_NS", 0)
    index = tmp_path / "c" / f"v{FORMAT}" / "index"

    def rank_1_hashes_its_share():  # every other file, from the second on
        other = DigestIndex(index)
        for path in paths[1::2]:
            other.digest(str(path))
        other.save()

    cluster = ScriptedCluster(0, 2, barriers={"hashing the images (x)": rank_1_hashes_its_share})
    cache = FeatureCache(tmp_path / "c", quiet=True, cluster=cluster)
    feats, _ = cache.features(tiny, paths, desc="x")
    assert torch.equal(feats, expected) and (cache.hashed, cache.encoded) == (3, 0)
    assert cluster.log == ["checking the cache folder"] * 3 + [
        "hashing the images (x)",
        "the images still to encode (x)",  # nothing (every rank holds the same, by default)
    ]

    cache.cluster = None  # as a sweep does once every cell's features are encoded: each rank then runs alone
    cluster.log.clear()
    cache.features(tiny, paths, desc="alone")
    assert cluster.log == []  # no collective: the other ranks are not there to meet


# ---- a cache folder that can be read but not written ---------------------------------------------------------------


@pytest.fixture()
def read_only():
    """Make a folder tree read-only for this process: modes without write bits and, for root (whom modes do not stop),
    the immutable attribute too (chattr +i); the test is skipped where neither stops a write."""
    made: list[Path] = []

    def make(folder: Path) -> None:
        dirs = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]
        for d in dirs:
            d.chmod(0o555)
            made.append(d)
            if os.geteuid() == 0 and shutil.which("chattr"):
                subprocess.run(["chattr", "+i", str(d)], capture_output=True)
        try:
            (folder / ".write-test").write_text("x")
        except OSError:
            return
        (folder / ".write-test").unlink()
        pytest.skip("cannot make a folder read-only here (root without chattr)")

    yield make
    for d in reversed(made):
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        d.chmod(0o755)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def test_a_read_only_cache_serves_what_it_holds_and_names_itself_for_the_rest(tiny, tmp_path, read_only, settled):
    paths = write_pngs(tmp_path / "img", 3)
    feats, _ = FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths[:2])
    before = _tree(tmp_path / "c")
    read_only(tmp_path / "c")
    cache = FeatureCache(tmp_path / "c", quiet=True)
    assert cache.read_only is not None  # the reason, e.g. "Permission denied"
    again, _ = cache.features(tiny, paths[:2])
    assert torch.equal(again, feats) and (cache.encoded, cache.hashed) == (0, 0)  # the index is read too
    with pytest.raises(TaskResValueError) as err:
        cache.features(tiny, paths, desc="test")
    assert err.value.param == "cache_dir" and cache.encoded == 0  # before encoding
    assert str(err.value) == (
        f"cache_dir {str(tmp_path / 'c')!r} is not a writable folder ({cache.read_only}) and 1 image(s) (test) are "
        "not in it; make it writable, choose another folder, or encode without the cache."
    )
    with pytest.raises(TaskResValueError, match="is not a writable folder"):  # torchrun's ranks write to it
        FeatureCache(tmp_path / "c", quiet=True, cluster=ScriptedCluster(0, 2))
    assert _tree(tmp_path / "c") == before


def test_a_namespace_folder_that_cannot_be_written_is_named_before_encoding(tiny, tmp_path, read_only):
    paths = write_pngs(tmp_path / "img", 2)
    FeatureCache(tmp_path / "c", quiet=True).features(tiny, paths[:1])
    (folder,) = [p.parent for p in (tmp_path / "c").rglob("namespace.json")]
    read_only(folder)  # the cache folder itself stays writable
    cache = FeatureCache(tmp_path / "c", quiet=True)
    assert cache.read_only is None
    assert cache.features(tiny, paths[:1])[0].shape == (1, 32)
    with pytest.raises(TaskResValueError) as err:
        cache.features(tiny, paths)
    assert cache.encoded == 0
    assert str(err.value).startswith(f"cache_dir {str(tmp_path / 'c')!r}: {str(folder)!r} cannot be written (")
    assert str(err.value).endswith("); fix or remove it, or choose another cache folder.")


def test_eval_reads_a_read_only_warm_cache_and_training_that_must_encode_is_exit_2(env, capsys, read_only):
    tmp, base, _ = env
    assert run(["zeroshot", *base, "--out", str(tmp / "zs")], capsys)[0] == 0
    read_only(tmp / "cache")
    code, _, err = run(["eval", "--run", str(tmp / "zs"), "--quiet", "--cache-dir", str(tmp / "cache")], capsys)
    assert code == 0, err
    code, _, err = run(["train", *base, "--shots", "2", "--seed", "1", "--views", "0", "--out", str(tmp / "r")], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert re.search(
        rf"taskres: error: --cache-dir '{re.escape(str(tmp / 'cache'))}' is not a writable folder \(.+\) and \d+ "
        r"image\(s\) \(.+\) are not in it; make it writable",
        err,
    ), err
    assert not (tmp / "r").exists() and [p.name for p in tmp.iterdir() if p.name.startswith(".r.")] == []
