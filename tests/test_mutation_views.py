"""Training views (docs/mutation.md): two cached views alternate within a cycle; online views honour the crop scale
and the pixel limit they are given, stop on the first unreadable image with its own message, and an empty set of
images is an empty (0, 0) tensor. Expected pixels come from the RandomResizedCrop + flip written out in
tests/test_mutation_images.py, run through the tiny backbone of tests/conftest.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_mutation_images import _photo, rrc_flip

from taskres.data.images import online_seed, read_image
from taskres.errors import TaskResError
from taskres.views import OnlineViews, ViewBank, as_bank


@pytest.fixture()
def photos(tmp_path):
    return [str(_photo(tmp_path / "a.png", 50, 40, 3)), str(_photo(tmp_path / "b.png", 44, 60, 4))]


def expected_features(tiny, photos, names, seed, epoch, scale):
    pixels = [
        rrc_flip(Image.open(p).convert("RGB"), tiny.image_size, online_seed(seed, epoch, n), scale=scale)
        for p, n in zip(photos, names)
    ]
    return tiny.encode_images(torch.stack(pixels)).cpu().float()


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


def test_online_views_use_the_given_crop_scale(tiny, photos):
    names = ["a", "b"]
    scale = (0.3, 0.35)
    views = OnlineViews(tiny, photos, names, seed=2, scale=scale)
    got = views.epoch(0)
    torch.testing.assert_close(got, expected_features(tiny, photos, names, 2, 0, scale), rtol=1e-4, atol=1e-4)
    default = expected_features(tiny, photos, names, 2, 0, (0.08, 1.0))
    assert not torch.allclose(got, default, rtol=1e-4, atol=1e-4)  # the scale changes the features


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


def test_as_bank_draws_the_asked_number_of_online_views(tiny, photos):
    names = ["a", "b"]
    views = OnlineViews(tiny, photos, names, seed=6)
    bank = as_bank(views, 3)
    assert bank.shape[:2] == (3, 2)
    for v in range(3):
        expected = expected_features(tiny, photos, names, 6, -1 - v, (0.08, 1.0))
        torch.testing.assert_close(bank[v], expected, rtol=1e-4, atol=1e-4)
