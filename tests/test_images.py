"""Transforms and image reading (taskres.data.images) against computations written here independently of the
package (docs/mutation.md): CLIP's preprocessing and torchvision's RandomResizedCrop + flip written out with PIL and
numpy (test_views.py and test_cache.py use them too), the seeds' hash written out with hashlib, ``to_rgb`` against its
rule written out, and the whole message of each unreadable image."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from taskres.data.images import (
    DEFAULT_MAX_PIXELS,
    TRAIN_SCALE,
    ImageViews,
    online_seed,
    read_image,
    to_rgb,
    transform_spec,
    view_seed,
)
from taskres.errors import TaskResError

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's


STD = (0.26862954, 0.26130258, 0.27577711)


def write_photo(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: interpolation kernels give different pixels on it
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _normalise(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / np.float32(255)
    arr = (arr - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def clip_preprocess(img: Image.Image, size: int, resample=Image.BICUBIC) -> torch.Tensor:
    """CLIP's ``_transform``: shorter side to ``size`` (bicubic), centre crop, [0, 1], normalise."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), resample)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return _normalise(img.crop((left, top, left + size, top + size)))


def rrc_flip(img: Image.Image, size: int, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    return _rrc_flip(img, size, seed, scale, ratio)[0]


def _rrc_flip(img, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop(size, scale, bicubic) then RandomHorizontalFlip(0.5), from torch's global
    stream seeded with ``seed``: the crop's draws (area, log aspect ratio, up to 10 tries, then offsets), then one
    uniform draw for the flip."""
    torch.manual_seed(seed)
    width, height = img.size
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    box = None
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            box = (i, j, h, w)
            break
    assert box is not None, "the fallback centre crop is not exercised by these images"
    i, j, h, w = box
    out = img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)
    flipped = bool(torch.rand(1) < 0.5)
    if flipped:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return _normalise(out), flipped


@pytest.fixture()
def photos(tmp_path):
    return [
        str(write_photo(tmp_path / "wide.png", 61, 43, 0)),
        str(write_photo(tmp_path / "tall.png", 37, 58, 1)),
        str(write_photo(tmp_path / "square.png", 45, 45, 2)),
    ]


# ---- transforms and seeds ------------------------------------------------------------------------------------------


def test_test_transform_is_clips_preprocessing_bicubic(photos):
    data = ImageViews(photos, 32, MEAN, STD)
    assert len(data) == 3
    for k, path in enumerate(photos):
        i, pixels, error = data[k]
        assert (i, error) == (k, "")
        with Image.open(path) as img:
            img = img.convert("RGB")
            expected = clip_preprocess(img, 32)
            bilinear = clip_preprocess(img, 32, Image.BILINEAR)
        assert pixels.shape == (3, 32, 32)
        torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)
        assert (pixels - bilinear).abs().max() > 1e-2  # the check tells bicubic from bilinear


def test_train_transform_is_torchvisions_random_resized_crop_and_flip(photos):
    seeds = [view_seed(v, "img") for v in range(6)]
    flips = set()
    for path in photos:
        with Image.open(path) as img:
            img = img.convert("RGB")
        data = ImageViews([path] * len(seeds), 24, MEAN, STD, seeds)
        for k, seed in enumerate(seeds):
            _, pixels, error = data[k]
            assert error == ""
            expected, flipped = _rrc_flip(img, 24, seed)
            torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)
            flips.add(flipped)
    assert flips == {True, False}  # both branches of the flip were compared


def test_train_transform_scale_is_passed_through(photos):
    with Image.open(photos[0]) as img:
        img = img.convert("RGB")
    seed = view_seed(0, "x")
    data = ImageViews([photos[0]], 24, MEAN, STD, [seed], scale=(0.5, 0.6))
    torch.testing.assert_close(data[0][1], rrc_flip(img, 24, seed, scale=(0.5, 0.6)), rtol=0, atol=1e-5)
    assert TRAIN_SCALE == (0.08, 1.0)  # Dassl's RRCROP_SCALE default
    default = ImageViews([photos[0]], 24, MEAN, STD, [seed])
    torch.testing.assert_close(default[0][1], rrc_flip(img, 24, seed), rtol=0, atol=1e-5)


def test_item_transform_leaves_the_global_stream_alone(photos):
    data = ImageViews(photos, 24, MEAN, STD, [1, 2, 3])
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    data[0], data[1]
    assert torch.equal(torch.rand(4), expected)


def test_seeds_are_the_documented_hash_of_view_and_name():
    def reference(key):
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 2**63

    assert view_seed(3, "train/a.png") == reference("3|train/a.png")
    assert online_seed(7, 2, "train/a.png") == reference("online|7|2|train/a.png")
    assert online_seed(7, -1, "b") == reference("online|7|-1|b")
    values = {view_seed(v, n) for v in range(50) for n in ("a", "b")}
    assert len(values) == 100 and all(0 <= s < 2**63 for s in values)
    assert any(s >= 2**62 for s in values)  # the mask keeps 63 bits, not fewer


def test_transform_spec_names_everything_that_changes_pixels():
    test = transform_spec(224, MEAN, STD, None)
    assert test == {
        "size": 224,
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": "bicubic",
        "kind": "test",
        "resize": "shorter_side",
        "crop": "center",
    }
    train = transform_spec(224, MEAN, STD, 3)
    assert train == {
        "size": 224,
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": "bicubic",
        "kind": "train",
        "crop": "random_resized",
        "scale": [0.08, 1.0],
        "flip": 0.5,
        "view": 3,
    }
    assert transform_spec(224, MEAN, STD, 3, (0.5, 1.0))["scale"] == [0.5, 1.0]
    specs = [
        test,
        train,
        transform_spec(224, MEAN, STD, 4),
        transform_spec(336, MEAN, STD, None),
        transform_spec(224, (0.5,) * 3, STD, None),
        transform_spec(224, MEAN, (0.5,) * 3, None),
    ]
    assert len({repr(sorted(s.items())) for s in specs}) == len(specs)


# ---- to_rgb --------------------------------------------------------------------------------------------------------


def test_to_rgb_scales_by_the_images_value_range():
    i16 = Image.fromarray(np.array([[0, 65535], [32768, 1000]], dtype=np.uint16))
    assert i16.mode.startswith("I;16") or i16.mode == "I"
    expected = np.rint(np.array([[0, 65535], [32768, 1000]]) * (255.0 / 65535)).astype(np.uint8)
    out = np.asarray(to_rgb(i16))
    assert out.shape == (2, 2, 3) and np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)

    unit = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32), mode="F")
    assert np.array_equal(np.asarray(to_rgb(unit))[..., 1], [[0, 255], [128, 64]])
    byte_range = Image.fromarray(np.array([[0.0, 255.0], [100.0, 2.0]], dtype=np.float32), mode="F")
    assert np.array_equal(np.asarray(to_rgb(byte_range))[..., 1], [[0, 255], [100, 2]])
    stretched = Image.fromarray(np.array([[-10.0, 290.0], [140.0, -10.0]], dtype=np.float32), mode="F")
    assert np.array_equal(np.asarray(to_rgb(stretched))[..., 1], [[0, 255], [128, 0]])
    negative_ints = Image.fromarray(np.array([[-5, 5], [0, -5]], dtype=np.int32), mode="I")
    assert np.array_equal(np.asarray(to_rgb(negative_ints))[..., 0], [[0, 255], [128, 0]])
    flat = Image.fromarray(np.full((2, 2), -3.0, dtype=np.float32), mode="F")
    assert np.array_equal(np.asarray(to_rgb(flat))[..., 0], np.zeros((2, 2)))

    rgba = Image.fromarray(np.array([[[10, 20, 30, 0]]], dtype=np.uint8), mode="RGBA")
    assert to_rgb(rgba).mode == "RGB" and np.asarray(to_rgb(rgba)).tolist() == [[[10, 20, 30]]]


def _grey(img: Image.Image) -> list:
    out = np.asarray(to_rgb(img))
    assert out.ndim == 3 and out.shape[2] == 3 and np.array_equal(out[..., 0], out[..., 2])
    return out[..., 0].tolist()


@pytest.mark.parametrize(
    ("values", "mode", "top"),
    [
        # float images: [0, 1] is scaled by 255, [0, 255] kept, anything else stretched min..max; ranges that do not
        # span the whole scale, so that scaling and stretching differ, and values at each boundary
        ([0.2, 0.6], "F", 1.0),
        ([0.0, 1.0], "F", 1.0),
        ([0.2, 1.5], "F", 255.0),
        ([0.0, 100.0], "F", 255.0),
        ([50.0, 255.0], "F", 255.0),
        ([10.0, 255.5], "F", None),
        ([-1.0, 100.0], "F", None),
        # integer images: 16-bit data [0, 65535] scaled by 255 / 65535, anything else stretched
        ([1000, 2000], "I", 65535.0),
        ([0, 1000], "I", 65535.0),
        ([1000, 65535], "I", 65535.0),
        ([65407, 0], "I", 65535.0),  # 65407 / 257 = 254.502: 255 here, 254 with 65536 for 65535
        ([1000, 65536], "I", None),
        ([70000, 70001], "I", None),  # a range of 1: 0 and 255
    ],
)
def test_to_rgb_scales_or_stretches_by_the_value_range(values, mode, top):
    """to_rgb against the rule written out: scale a standard range by 255 / top, otherwise map min..max to
    0..255 (a range below 1 counts as 1), rounded to the nearest integer."""
    dtype = np.float32 if mode == "F" else np.int32
    arr = np.array([values], dtype=dtype)
    data = arr.astype(np.float64)
    if top is None:
        data, top = data - data.min(), max(float(data.max() - data.min()), 1.0)
    expected = np.rint(data * (255.0 / top)).astype(int).tolist()
    assert _grey(Image.fromarray(arr, mode=mode)) == expected


def test_an_empty_high_bit_depth_image_converts_to_an_empty_rgb_image():
    for mode in ("F", "I", "I;16"):
        out = to_rgb(Image.new(mode, (0, 0)))
        assert out.mode == "RGB" and out.size == (0, 0)


# ---- reading: the pixel limit and unreadable images ----------------------------------------------------------------


def test_pixel_limit_is_inclusive(tmp_path):
    path = write_photo(tmp_path / "p.png", 10, 6)
    assert read_image(path, max_pixels=60).size == (10, 6)
    assert read_image(path, max_pixels=None).size == (10, 6)
    assert read_image(path).mode == "RGB"
    with pytest.raises(TaskResError, match="60 pixels, more than the limit of 59"):
        read_image(path, max_pixels=59)
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_pixel_limit_error_names_the_setting_and_the_memory(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (512, 512)).save(path)  # 4 bytes a pixel: exactly 1 MiB decoded
    with pytest.raises(
        TaskResError,
        match=r"is 512 x 512 = 262144 pixels, more than the limit of 1000 \(decoding it "
        r"would take about 1 MiB\)",
    ) as err:
        read_image(path, max_pixels=1000)
    assert err.value.param == "max_image_pixels"


def test_the_pixel_limit_unreadable_and_undecodable_messages_are_whole(tmp_path, monkeypatch):
    import taskres.data.images as images

    path = tmp_path / "big.png"
    Image.new("RGB", (1024, 640)).save(path)  # 2.5 MiB decoded at 4 bytes a pixel
    with pytest.raises(TaskResError) as err:
        read_image(path, max_pixels=1000)
    assert str(err.value) == (
        f"image {str(path)!r} is 1024 x 640 = 655360 pixels, more than the limit of 1000 (decoding it would take "
        "about 2 MiB); downscale it, or raise the limit with `max_image_pixels`."
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(TaskResError) as err:
        read_image(broken)
    assert str(err.value).startswith(f"image {str(broken)!r} cannot be decoded (")
    assert str(err.value).endswith("); replace or remove the file, or pass --skip-bad-images to leave such images out.")

    def locked(*args, **kwargs):  # what the OS says for a file without read permission (root reads any file)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images.Image, "open", locked)
    with pytest.raises(TaskResError) as err:
        read_image(path)
    assert str(err.value) == f"image {str(path)!r} cannot be read (Permission denied); fix its permissions."


def test_a_missing_image_and_a_folder_get_the_whole_message_with_the_fix(tmp_path):
    """The user reads the whole hint: where the paths come from and what to check."""
    missing = tmp_path / "gone.png"
    with pytest.raises(TaskResError) as err:
        read_image(missing)
    assert str(err.value) == (
        f"image {str(missing)!r} does not exist; check the data folder (--data/--root) and the split file's paths, "
        "which are relative to it."
    )
    with pytest.raises(TaskResError) as err:
        read_image(tmp_path)
    assert str(err.value) == (
        f"image {str(tmp_path)!r} is a folder, not an image file; check the data folder (--data/--root) and the "
        "split file's paths."
    )


def test_bad_images_give_zeros_and_the_message(tmp_path, photos):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    data = ImageViews([photos[0], str(broken), str(tmp_path / "missing.png")], 16, MEAN, STD)
    for k in (1, 2):
        i, pixels, error = data[k]
        assert i == k and torch.equal(pixels, torch.zeros(3, 16, 16)) and error
    assert "cannot be decoded" in data[1][2] and "does not exist" in data[2][2]
    assert data[0][2] == ""
    with pytest.raises(TaskResError, match="one seed per image"):
        ImageViews(photos, 16, MEAN, STD, seeds=[1])
    too_big = ImageViews([photos[0]], 16, MEAN, STD, max_pixels=10)
    assert "more than the limit" in too_big[0][2]
