"""Training views (taskres.views): cached views come from a bank whose seeded order visits every view once a cycle;
online views encode fresh, seeded augmentations every epoch, honour the crop scale and the pixel limit they are given,
stop on the first unreadable image with its own message, and an empty set of images is an empty (0, 0) tensor.
Expected features come from the RandomResizedCrop + flip written out in tests/test_images.py, run through the tiny
backbone of tests/conftest.py (docs/mutation.md). `train --views` end to end: tests/test_cli_views.py."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image
from test_images import rrc_flip, write_photo

from taskres.data.images import online_seed, read_image
from taskres.errors import TaskResError
from taskres.views import OnlineViews, ViewBank, as_bank, as_views


@pytest.fixture()
def photos(tmp_path):
    return [str(write_photo(tmp_path / "a.png", 50, 40, 3)), str(write_photo(tmp_path / "b.png", 44, 60, 4))]


@pytest.fixture()
def three_photos(tmp_path):
    """A wide, a tall and a square image: two batches of two for the online encoder."""
    shapes = (("wide", 61, 43, 0), ("tall", 37, 58, 1), ("square", 45, 45, 2))
    return [str(write_photo(tmp_path / f"{name}.png", w, h, seed)) for name, w, h, seed in shapes]


def expected_features(tiny, photos, names, seed, epoch, scale):
    pixels = [
        rrc_flip(Image.open(p).convert("RGB"), tiny.image_size, online_seed(seed, epoch, n), scale=scale)
        for p, n in zip(photos, names)
    ]
    return tiny.encode_images(torch.stack(pixels)).cpu().float()


def online(tiny, image_dir, seed):
    names = [f"train/{c}_{i}.png" for i in range(3) for c in ("red", "green", "blue")]
    return OnlineViews(tiny, [str(image_dir / n) for n in names], names, seed)


# ---- cached views: the view bank -----------------------------------------------------------------------------------


def test_view_bank_visits_every_view_once_per_cycle():
    V, N = 4, 7
    views = torch.arange(V * N).float().reshape(V, N, 1)  # view v of image i holds N * v + i
    bank = ViewBank(views, seed=5)
    assert (bank.num_views, bank.num_samples) == (V, N)
    seen = []
    for epoch in range(3 * V):
        feats = bank.epoch(epoch)[:, 0]
        assert feats.shape == (N,)
        assert torch.equal(feats.long() % N, torch.arange(N))  # image i reads one of its own views
        seen.append(feats.long() // N)
    seen = torch.stack(seen)  # (epochs, N) view indices
    for cycle in range(3):
        block = seen[cycle * V : (cycle + 1) * V]
        assert torch.equal(block.sort(dim=0).values, torch.arange(V).unsqueeze(1).expand(V, N))
    assert not torch.equal(seen[:V], seen[V : 2 * V])  # each cycle draws a new order
    assert not torch.equal(seen[0], torch.zeros(N, dtype=torch.long))  # images do not move in lockstep
    again = ViewBank(views, seed=5)
    assert torch.equal(
        torch.stack([again.epoch(e)[:, 0] for e in reversed(range(3 * V))]).flip(0).long() // N, seen
    )  # the order is a function of (seed, epoch), not of the call history
    other = ViewBank(views, seed=6)
    assert not torch.equal(torch.stack([other.epoch(e)[:, 0] for e in range(3 * V)]).long() // N, seen)
    assert torch.equal(bank.bank(), views)


def test_view_bank_order_is_the_documented_seeded_draw():
    bank = ViewBank(torch.zeros(3, 5, 2), seed=11)
    digest = hashlib.sha256(b"views|11|2").digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    assert torch.equal(bank.order(2), torch.rand(5, 3, generator=g).argsort(dim=1))
    assert torch.equal(bank.view_index(7), bank.order(2)[:, 1])


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


def test_two_cached_views_alternate_within_each_cycle():
    N = 6
    views = torch.stack([torch.zeros(N, 1), torch.ones(N, 1)]) + 10 * torch.arange(N).float().view(1, N, 1)
    bank = ViewBank(views, seed=3)
    assert bank.num_views == 2
    for cycle in range(3):
        first, second = bank.epoch(2 * cycle), bank.epoch(2 * cycle + 1)
        assert torch.equal(first // 10, torch.arange(N).float().view(N, 1))  # each image reads its own views
        assert torch.equal((first % 10) + (second % 10), torch.ones(N, 1))  # view 0 once and view 1 once
    assert not torch.equal(bank.epoch(0), bank.views[0])  # not every image starts on view 0


def test_single_view_and_two_dimensional_features():
    feats = torch.randn(5, 3)
    bank = as_views(feats, seed=0)
    assert bank.num_views == 1 and bank.num_samples == 5
    for epoch in range(3):
        assert torch.equal(bank.epoch(epoch), feats)
    assert torch.equal(as_bank(feats, 4), feats.unsqueeze(0))
    three = torch.randn(2, 5, 3)
    assert as_bank(three, 4) is three
    assert as_views(bank, 1) is bank


# ---- online views --------------------------------------------------------------------------------------------------


def test_online_views_encode_the_seeded_draws(tiny, three_photos):
    names = ["wide", "tall", "square"]
    views = OnlineViews(tiny, three_photos, names, seed=4, batch_size=2)
    assert views.num_samples == 3
    e1 = views.epoch(1)
    expected = tiny.encode_images(
        torch.stack(
            [
                rrc_flip(Image.open(p).convert("RGB"), tiny.image_size, online_seed(4, 1, n))
                for p, n in zip(three_photos, names)
            ]
        )
    )
    torch.testing.assert_close(e1, expected.cpu().float(), rtol=1e-4, atol=1e-4)
    bank = views.bank(2)
    expected_bank = tiny.encode_images(
        torch.stack(
            [
                rrc_flip(Image.open(p).convert("RGB"), tiny.image_size, online_seed(4, -2, n))
                for p, n in zip(three_photos, names)
            ]
        )
    )
    assert bank.shape == (2, 3, e1.shape[1])
    torch.testing.assert_close(bank[1], expected_bank.cpu().float(), rtol=1e-4, atol=1e-4)
    assert views.encoded == 9
    with pytest.raises(TaskResError, match="one name per image"):
        OnlineViews(tiny, three_photos, names[:2], seed=0)


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


def test_online_views_use_the_given_crop_scale(tiny, photos):
    names = ["a", "b"]
    scale = (0.3, 0.35)
    views = OnlineViews(tiny, photos, names, seed=2, scale=scale)
    got = views.epoch(0)
    torch.testing.assert_close(got, expected_features(tiny, photos, names, 2, 0, scale), rtol=1e-4, atol=1e-4)
    default = expected_features(tiny, photos, names, 2, 0, (0.08, 1.0))
    assert not torch.allclose(got, default, rtol=1e-4, atol=1e-4)  # the scale changes the features


def test_as_bank_draws_the_asked_number_of_online_views(tiny, photos):
    names = ["a", "b"]
    views = OnlineViews(tiny, photos, names, seed=6)
    bank = as_bank(views, 3)
    assert bank.shape[:2] == (3, 2)
    for v in range(3):
        expected = expected_features(tiny, photos, names, 6, -1 - v, (0.08, 1.0))
        torch.testing.assert_close(bank[v], expected, rtol=1e-4, atol=1e-4)


def test_online_views_refuse_images_over_their_pixel_limit(tiny, photos):
    views = OnlineViews(tiny, photos, ["a", "b"], seed=0, max_pixels=1000)
    with pytest.raises(TaskResError) as err:
        views.epoch(0)
    with pytest.raises(TaskResError) as direct:
        read_image(photos[0], 1000)
    assert str(err.value) == str(direct.value)
    assert "50 x 40 = 2000 pixels, more than the limit of 1000" in str(err.value)
    assert views.encoded == 0


def test_online_views_stop_on_a_missing_image_with_its_message(tiny, photos, tmp_path):
    missing = str(tmp_path / "gone.png")
    views = OnlineViews(tiny, [photos[0], missing], ["a", "gone"], seed=0)
    with pytest.raises(TaskResError) as err:
        views.epoch(0)
    with pytest.raises(TaskResError) as direct:
        read_image(missing)
    assert str(err.value) == str(direct.value) and "does not exist" in str(err.value)


def test_online_views_of_no_images_are_an_empty_tensor(tiny):
    views = OnlineViews(tiny, [], [], seed=0)
    out = views.epoch(0)
    assert isinstance(out, torch.Tensor) and out.shape == (0, 0)
    assert views.encoded == 0
