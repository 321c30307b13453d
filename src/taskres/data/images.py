"""Reading images and CLIP's transforms (docs/protocol.md#images-and-transforms), with reproducible augmented views.

The test transform: resize the shorter side to the model's size (bicubic), centre crop, normalise. The train
transform: RandomResizedCrop (scale (0.08, 1) by default), bicubic, horizontal flip, normalise, drawn from a
generator with an explicit seed per image. Seeds depend on the image's ``name`` (its path relative to the dataset's
image folder), never on where the dataset lies: a bank view ``v`` of an image is seeded by (v, name), an online draw
by (run seed, epoch, name). So copying or moving a dataset gives the same pixels, and every worker process agrees.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from taskres.errors import TaskResError, TaskResFileNotFoundError, TaskResValueError

TRAIN_SCALE = (0.08, 1.0)  # Dassl's RRCROP_SCALE default
# Larger images are refused (a decoded RGB image takes 3-4 bytes a pixel, more in the resize): 64 MP covers
# the photos of today's cameras and phones (~50 MP).
DEFAULT_MAX_PIXELS = 64_000_000


def transform_spec(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    view: int | None,
    scale: tuple[float, float] = TRAIN_SCALE,
) -> dict:
    """Everything about a transform that changes the pixels, for cache keys."""
    spec = {"size": image_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic"}
    if view is None:
        return {**spec, "kind": "test", "resize": "shorter_side", "crop": "center"}
    return {**spec, "kind": "train", "crop": "random_resized", "scale": list(scale), "flip": 0.5, "view": view}


def build_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    scale: tuple[float, float] = TRAIN_SCALE,
) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms as T  # here, not at import: torchvision pulls in torch._dynamo (seconds)

    BICUBIC = T.InterpolationMode.BICUBIC
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if not augment:
        return T.Compose([T.Resize(image_size, interpolation=BICUBIC), T.CenterCrop(image_size), *normalize])
    return T.Compose(
        [T.RandomResizedCrop(image_size, scale=scale, interpolation=BICUBIC), T.RandomHorizontalFlip(), *normalize]
    )


def _seed(key: str) -> int:
    # a file name's byte that is not UTF-8 (a surrogate escape, as os.fsdecode gives) is hashed as that byte
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def view_seed(view: int, name: str) -> int:
    """Seed of bank view ``view`` of the image called ``name`` (its path relative to the image folder)."""
    return _seed(f"{view}|{name}")


def online_seed(seed: int, epoch: int, name: str) -> int:
    """Seed of the online augmentation of image ``name`` in epoch ``epoch`` of a run with seed ``seed``."""
    return _seed(f"online|{seed}|{epoch}|{name}")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB by the image's real value range: 16-bit and 32-bit integer greyscale scaled down (PIL would clip
    them, and a 16-bit image turns white), float greyscale from [0, 1] (or [0, 255]) to [0, 255]; every 8-bit mode
    as PIL converts it (alpha dropped, palettes applied), so those pixels are unchanged."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if img.mode == "F":
            top = 1.0 if lo >= 0 and hi <= 1 else 255.0 if lo >= 0 and hi <= 255 else None
        else:  # 16-bit data (PIL opens 16-bit PNGs and TIFFs as I;16 or I); other integer data by its own range
            top = 65535.0 if lo >= 0 and hi <= 65535 else None
        if top is None:  # values outside any standard range: stretch min..max
            arr, top = arr - lo, max(hi - lo, 1.0)
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB (``to_rgb``); a missing, unreadable, undecodable or oversized file (more than
    ``max_pixels`` pixels, None: no limit; PIL's own guard is off, so this is the limit in force) is a TaskResError
    that names it."""
    path = str(path)
    if os.path.isdir(path):
        raise TaskResValueError(
            f"image {path!r} is a folder, not an image file; check the data folder "
            "(--data/--root) and the split file's paths."
        )
    if not os.path.isfile(path):
        raise TaskResFileNotFoundError(
            f"image {path!r} does not exist; check the data folder (--data/--root) "
            "and the split "
            "file's paths, which are relative to it."
        )
    try:
        with _our_pixel_limit(), Image.open(path) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise TaskResValueError(
                    f"image {path!r} is {width} x {height} = {width * height} pixels, more than the limit of "
                    f"{max_pixels} (decoding it would take about {width * height * 4 // 2**20} MiB); downscale it, "
                    "or raise the limit with `max_image_pixels`.",
                    param="max_image_pixels",
                )
            return to_rgb(img)
    except TaskResError:  # the pixel limit's own error, raised above: not a decoding failure
        raise
    except PermissionError as err:
        raise TaskResValueError(f"image {path!r} cannot be read ({err.strerror}); fix its permissions.") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise TaskResValueError(
            f"image {path!r} cannot be decoded ({err}); replace or remove the file, or pass "
            "--skip-bad-images to leave such images out."
        ) from None


_pil_guard_lock = threading.Lock()
_pil_guard_users = 0  # read_image calls in progress in this process (threads), which PIL's own guard leaves alone
_pil_guard_saved: int | None = None


@contextlib.contextmanager
def _our_pixel_limit() -> Iterator[None]:
    """PIL's own bomb guard off while we decode, so that ``max_pixels`` is the limit in force: PIL refuses images
    above twice ``Image.MAX_IMAGE_PIXELS`` (about 179 million pixels) whatever limit the user set, and warns above
    it. The guard is a module global: the calls in progress are counted so that threads do not restore it under
    each other (DataLoader workers are processes, each with its own)."""
    global _pil_guard_users, _pil_guard_saved
    with _pil_guard_lock:
        if _pil_guard_users == 0:
            _pil_guard_saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _pil_guard_users += 1
    try:
        yield
    finally:
        with _pil_guard_lock:
            _pil_guard_users -= 1
            if _pil_guard_users == 0:
                Image.MAX_IMAGE_PIXELS = _pil_guard_saved


def _reset_pil_guard_in_child() -> None:
    """A forked child (a DataLoader worker) has none of the parent's other threads: none is reading."""
    global _pil_guard_lock, _pil_guard_users
    if _pil_guard_users:
        Image.MAX_IMAGE_PIXELS = _pil_guard_saved
    _pil_guard_lock, _pil_guard_users = threading.Lock(), 0


os.register_at_fork(after_in_child=_reset_pil_guard_in_child)


class ImageViews(torch.utils.data.Dataset):
    """Transformed images for a list of paths; item = (index, pixels, error). ``error`` is "" for a good image; for
    a missing or undecodable one it is the message, and the pixels are zeros. The caller decides whether to raise,
    in the main process, so that the message reaches the user intact even from a worker process.

    ``seeds`` None: the test transform, unless ``augment``. Otherwise one seed per path for its train-transform
    draw. With ``augment`` and no seeds, each item is asked for as ``(index, seed)``: the decoding pool of online
    views (taskres.views) reads a new draw of the same images every epoch without being rebuilt.
    """

    def __init__(
        self,
        paths: Sequence[str],
        image_size: int,
        mean,
        std,
        seeds: Sequence[int] | None = None,
        scale: tuple[float, float] = TRAIN_SCALE,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        augment: bool | None = None,
    ):
        self.paths, self.seeds, self.size = list(paths), None if seeds is None else list(seeds), image_size
        self.max_pixels = max_pixels
        if self.seeds is not None and len(self.seeds) != len(self.paths):
            raise TaskResValueError(f"one seed per image: {len(self.seeds)} seeds for {len(self.paths)} paths.")
        self.augment = self.seeds is not None if augment is None else augment
        self.transform = build_transform(image_size, mean, std, self.augment, scale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list:
        """A batch of items (the DataLoader asks for whole batches): the global RNG is saved and restored once per
        batch, and each draw seeds the CPU generator alone (``torch.manual_seed`` would also seed every other
        device, about a millisecond an image); the pixels are those of ``torch.manual_seed(seed)``."""
        if not self.augment:
            return [self._item(i, None) for i in keys]  # type: ignore[arg-type]  # the test transform: ints
        with torch.random.fork_rng(devices=[]):
            return [self._item(*self._draw(key)) for key in keys]

    def _draw(self, key: int | tuple[int, int]) -> tuple[int, int]:
        if isinstance(key, tuple):
            return key
        if self.seeds is None:
            raise TaskResValueError("augmented views without seeds are asked for as (index, seed).")
        return key, self.seeds[key]

    def _item(self, i: int, seed: int | None):
        try:
            img = read_image(self.paths[i], self.max_pixels)
        except TaskResError as err:
            return i, torch.zeros(3, self.size, self.size), str(err)
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        return i, self.transform(img), ""
