"""The base classifiers, the cache keys and the safe checkpoint reader against computations written out here
(docs/mutation.md): text features averaged by hand, the documented key hash, checkpoints built in the test."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import encode_texts, write_pngs

from taskres.cache import FORMAT, FeatureCache, image_key
from taskres.data.sampling import sample_fewshot
from taskres.data.splits import DatasetSplits, Entry
from taskres.errors import TaskResError
from taskres.safe_load import Inert, load_checkpoint, load_plain_pickle
from taskres.text import build_base_classifier, check_prompts_fit, check_templates, normalized_text_classifier


def test_base_classifier_rows_are_mean_unnormalised_embeddings(tiny):
    templates = ["a photo of a {}.", "{} art."]
    names = ["sea_lion", "cat", "red fox"]
    base = build_base_classifier(tiny, names, templates)
    assert base.shape == (3, 32) and base.dtype == torch.float32
    for row, name in zip(base, names):
        torch.testing.assert_close(
            row, encode_texts(tiny, [t.format(name) for t in templates]).mean(0), rtol=1e-5, atol=1e-6
        )


def test_base_classifier_in_half_precision(tiny):
    templates = ["a photo of a {}.", "{} art."]
    half = build_base_classifier(tiny, ["cat", "dog"], templates, text_precision="fp16")
    full = build_base_classifier(tiny, ["cat", "dog"], templates)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
    assert next(tiny.model.parameters()).dtype == torch.float32  # the backbone itself stays fp32
    with pytest.raises(TaskResError):
        build_base_classifier(tiny, ["cat"], templates, text_precision="bf16")


def test_normalized_classifier_is_coops_zero_shot_rows(tiny):
    templates = ["a photo of a {}.", "{} art.", "a {} in the wild."]
    rows = normalized_text_classifier(tiny, ["sea_lion", "cat"], templates)
    for row, name in zip(rows, ["sea lion", "cat"]):  # underscores become spaces
        expected = F.normalize(
            F.normalize(encode_texts(tiny, [t.format(name) for t in templates]), dim=-1).mean(0), dim=0
        )
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
    one = normalized_text_classifier(tiny, ["cat"], ["a photo of a {}."])
    torch.testing.assert_close(
        one[0], F.normalize(encode_texts(tiny, ["a photo of a cat."])[0], dim=0), rtol=1e-5, atol=1e-6
    )


def test_templates_need_exactly_one_placeholder():
    assert check_templates(["a {}.", "b {} {{x}}"]) == ("a {}.", "b {} {{x}}")
    for bad in ([], ["no slot"], ["{} and {}"], ["{} {0}"], ["{} {x}"], ["{} {"]):
        with pytest.raises(TaskResError):
            check_templates(bad)


def test_prompt_length_limit_counts_start_and_end_tokens(tiny):
    context = tiny.tokenizer.context_length
    word = "cat"
    n_word = len(tiny.tokenizer.encode(word + " "))  # tokens one repetition adds
    fits = " ".join([word] * (context - 2))
    assert len(tiny.tokenizer.encode(fits)) + 2 == context and n_word == 1
    check_prompts_fit(tiny, [fits], ["{}"])  # exactly the context: fits
    with pytest.raises(TaskResError, match=f"is {context + 1} tokens, but the text encoder reads {context}"):
        check_prompts_fit(tiny, [fits + " cat"], ["{}"])
    # with underscores replaced, "a_b" is two words: counted as the text that is encoded
    under = "_".join(["cat"] * (context - 2))
    with pytest.raises(TaskResError):
        check_prompts_fit(tiny, [under + "_cat"], ["{}"], replace_underscores=True)


def test_image_key_is_the_documented_hash(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"123456")
    st = os.stat(path)
    expected = hashlib.sha256(f"train/a.png|6|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    assert image_key(path, "train/a.png") == expected
    absolute = hashlib.sha256(f"{os.path.abspath(path)}|6|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    assert image_key(path) == absolute
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert image_key(path, "train/a.png") != expected  # a touched file is a new key
    with pytest.raises(TaskResError, match="does not exist"):
        image_key(tmp_path / "missing.png")


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
    folders = sorted(p for p in cache.root.iterdir() if p.is_dir())
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
    renamed, _ = again.features(tiny, paths, names=["x" + n for n in names])  # names are part of the key
    assert again.encoded == 4
    torch.testing.assert_close(renamed, test)
    no_cache = FeatureCache(None, quiet=True)
    torch.testing.assert_close(no_cache.features(tiny, paths, names=names)[0], test)
    assert no_cache.encoded == 4 and no_cache.root is None


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


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_reader_keeps_tensors_and_refuses_code(tmp_path):
    weights = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 50}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    good = tmp_path / "model.pth.tar"
    torch.save({**weights, "optimizer": opt, "scheduler": None}, good)
    ckpt = load_checkpoint(good)
    assert torch.equal(ckpt["state_dict"]["w"], weights["state_dict"]["w"]) and ckpt["epoch"] == 50
    assert isinstance(ckpt["optimizer"], Inert)
    plain = tmp_path / "plain.pt"
    torch.save(weights, plain)
    assert torch.equal(load_checkpoint(plain)["state_dict"]["w"], weights["state_dict"]["w"])
    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(TaskResError, match=r"refused: its pickle calls .*system"):
        load_checkpoint(evil, what="strong_base")
    with pytest.raises(TaskResError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes()[:200])
    with pytest.raises(TaskResError, match="cannot be read safely"):
        load_checkpoint(damaged)


class Record:
    def __init__(self, *args):
        self.args = args


def test_plain_pickle_reader_builds_only_allowed_records(tmp_path):
    data = tmp_path / "ok.pkl"
    data.write_bytes(pickle.dumps({"a": [1, 2.5, "x"], "b": (None, True)}))
    assert load_plain_pickle(data, {}) == {"a": [1, 2.5, "x"], "b": (None, True)}
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(TaskResError, match=r"refused: its pickle asks for '(posix|os)\.system'"):
        load_plain_pickle(evil, {}, what="split")
    truncated = tmp_path / "t.pkl"
    truncated.write_bytes(pickle.dumps(list(range(100)))[:20])
    with pytest.raises(TaskResError, match=r"cannot be read \(pickle data was truncated\)"):
        load_plain_pickle(truncated, {})
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(TaskResError, match="cannot be read as a pickle .EOFError"):
        load_plain_pickle(empty, {})
    with pytest.raises(TaskResError, match="does not exist"):
        load_plain_pickle(tmp_path / "none.pkl", {})
    rec = tmp_path / "rec.pkl"
    rec.write_bytes(pickle.dumps(Record(1, 2)))
    name = f"{Record.__module__}.Record"
    out = load_plain_pickle(rec, {name: Record})
    assert isinstance(out, Record) and out.__dict__ == {"args": (1, 2)}


@pytest.mark.parametrize("shots", [True, False, 2.0, "3", None])
def test_shots_must_be_a_plain_integer(shots, tmp_path):
    entries = tuple(Entry(f"{i}.png", i % 2, f"c{i % 2}") for i in range(8))
    ds = DatasetSplits("toy", image_dir=tmp_path, train=entries, val=entries, test=entries, classnames=("c0", "c1"))
    with pytest.raises(TaskResError, match="--shots must be an integer >= 1"):
        sample_fewshot(ds, shots, 0)
    assert len(sample_fewshot(ds, 1, 0)["train"]) == 2
