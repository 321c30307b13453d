import logging

import numpy as np
import pytest
import torch
from PIL import Image

from taskres.backbones import load_backbone
from taskres.cache import FeatureCache
from taskres.errors import TaskResError
from taskres.text import build_base_classifier


@pytest.fixture(scope="module")
def backbone(openai_rn_file):
    return load_backbone(str(openai_rn_file))


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


def test_round_trip_is_bit_exact_and_reused(backbone, images, tmp_path):
    plain, _ = FeatureCache(None, batch_size=3, quiet=True).features(backbone, images)
    cache = FeatureCache(tmp_path / "c", batch_size=3, quiet=True)
    first, _ = cache.features(backbone, images)
    assert cache.encoded == 7 and torch.equal(first, plain)
    again = FeatureCache(tmp_path / "c", quiet=True)
    second, _ = again.features(backbone, images[::-1])
    assert again.encoded == 0 and torch.equal(second, plain.flip(0))


def test_changed_image_view_or_backbone_is_a_miss(backbone, images, tmp_path, openai_vit_jit_file):
    cache = FeatureCache(tmp_path / "c", quiet=True)
    before, _ = cache.features(backbone, images)
    Image.new("RGB", (40, 40), (255, 0, 0)).save(images[2])
    cache.encoded = 0
    after, _ = cache.features(backbone, images)
    assert cache.encoded == 1
    assert not torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    cache.encoded = 0
    v0, _ = cache.features(backbone, images, view=0)
    v1, _ = cache.features(backbone, images, view=1)
    assert cache.encoded == 14 and not torch.equal(v0, v1) and not torch.equal(v0, after)
    v0_again, _ = FeatureCache(tmp_path / "c", quiet=True).features(backbone, images, view=0)
    assert torch.equal(v0, v0_again)  # augmented views are reproducible
    other = FeatureCache(tmp_path / "c", quiet=True)
    other.features(load_backbone(str(openai_vit_jit_file)), images)
    assert other.encoded == 7


def test_corrupt_chunk_is_rebuilt_with_a_warning(backbone, images, tmp_path, caplog):
    cache = FeatureCache(tmp_path / "c", chunk_size=4, batch_size=4, quiet=True)
    good, _ = cache.features(backbone, images)
    chunks = sorted((tmp_path / "c").rglob("chunk-*.safetensors"))
    assert len(chunks) == 2
    data = chunks[0].read_bytes()
    chunks[0].write_bytes(data[: len(data) // 2])  # truncated
    fresh = FeatureCache(tmp_path / "c", quiet=True)
    with caplog.at_level(logging.WARNING):
        again, _ = fresh.features(backbone, images)
    assert "is corrupt" in caplog.text
    assert fresh.encoded in (3, 4) and torch.equal(again, good)


def test_flipped_bytes_fail_the_checksum(backbone, images, tmp_path, caplog):
    cache = FeatureCache(tmp_path / "c", quiet=True)
    good, _ = cache.features(backbone, images)
    (chunk,) = (tmp_path / "c").rglob("chunk-*.safetensors")
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the header still parses
    chunk.write_bytes(bytes(data))
    fresh = FeatureCache(tmp_path / "c", quiet=True)
    with caplog.at_level(logging.WARNING):
        again, _ = fresh.features(backbone, images)
    assert "checksum" in caplog.text and fresh.encoded == 7 and torch.equal(again, good)


def test_interrupted_extraction_resumes(backbone, images, tmp_path):
    images[5].write_bytes(b"not an image")
    # chunks hold up to 1024 images: the four encoded before the error are flushed when it stops
    cache = FeatureCache(tmp_path / "c", batch_size=2, quiet=True)
    with pytest.raises(TaskResError, match=r"5.png' cannot be decoded"):
        cache.features(backbone, images)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(images[5])
    resumed = FeatureCache(tmp_path / "c", quiet=True)
    resumed.features(backbone, images)
    assert resumed.encoded == 3  # images 0-3 were kept from the interrupted run


def test_skip_bad_images(backbone, images, tmp_path):
    images[1].write_bytes(b"garbage")
    feats, skipped = FeatureCache(tmp_path / "c", quiet=True).features(backbone, images, skip_bad=True)
    assert skipped == [str(images[1])] and feats.shape == (7, 32) and torch.equal(feats[1], torch.zeros(32))


def test_base_classifier_is_the_mean_of_unnormalised_embeddings(backbone):
    templates = ["a photo of a {}.", "art of the {}.", "{} texture."]
    base = build_base_classifier(backbone, ["american_bulldog", "cat"], templates)
    tokens = backbone.tokenizer([t.format("american_bulldog") for t in templates])
    expected = backbone.model.encode_text(tokens).mean(dim=0)
    torch.testing.assert_close(base[0], expected)
    assert not torch.allclose(base[0].norm(), torch.tensor(1.0))
    cleaned = build_base_classifier(backbone, ["american bulldog"], templates)
    assert not torch.allclose(cleaned[0], base[0])  # underscores are kept, so the base differs


def test_template_without_placeholder(backbone):
    with pytest.raises(TaskResError, match=r"template 'a photo' must contain exactly one '\{\}'"):
        build_base_classifier(backbone, ["cat"], ["a photo"])


def test_bad_image_in_a_worker_process_keeps_its_message(backbone, images, tmp_path):
    images[3].write_bytes(b"garbage")
    with pytest.raises(TaskResError, match=r"^image '.*3.png' cannot be decoded"):
        FeatureCache(tmp_path / "c", workers=1, quiet=True).features(backbone, images)
