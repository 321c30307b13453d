"""Reading images and CLIP's transforms (docs/protocol.md#images-and-transforms), with reproducible augmented views.

The test transform: resize the shorter side to the model's size (bicubic), centre crop, normalise. The train
transform: RandomResizedCrop (scale (0.08, 1) by default), bicubic, horizontal flip, normalise, drawn from a
generator with an explicit seed per image. Seeds depend on the image's ``name`` (its path relative to the dataset's
image folder), never on where the dataset lies: a bank view ``v`` of an image is seeded by (v, name), an online draw
by (run seed, epoch, name). So copying or moving a dataset gives the same pixels, and every worker process agrees.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from taskres.errors import TaskResError, TaskResFileNotFoundError, TaskResValueError

BICUBIC = T.InterpolationMode.BICUBIC
TRAIN_SCALE = (0.08, 1.0)  # Dassl's RRCROP_SCALE default


def transform_spec(image_size: int, mean: Sequence[float], std: Sequence[float], view: int | None,
                   scale: tuple[float, float] = TRAIN_SCALE) -> dict:
    """Everything about a transform that changes the pixels, for cache keys."""
    spec = {"size": image_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic"}
    if view is None:
        return {**spec, "kind": "test", "resize": "shorter_side", "crop": "center"}
    return {**spec, "kind": "train", "crop": "random_resized", "scale": list(scale), "flip": 0.5, "view": view}


def build_transform(image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool,
                    scale: tuple[float, float] = TRAIN_SCALE) -> T.Compose:
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if not augment:
        return T.Compose([T.Resize(image_size, interpolation=BICUBIC), T.CenterCrop(image_size), *normalize])
    return T.Compose([T.RandomResizedCrop(image_size, scale=scale, interpolation=BICUBIC),
                      T.RandomHorizontalFlip(), *normalize])


def _seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def view_seed(view: int, name: str) -> int:
    """Seed of bank view ``view`` of the image called ``name`` (its path relative to the image folder)."""
    return _seed(f"{view}|{name}")


def online_seed(seed: int, epoch: int, name: str) -> int:
    """Seed of the online augmentation of image ``name`` in epoch ``epoch`` of a run with seed ``seed``."""
    return _seed(f"online|{seed}|{epoch}|{name}")


def read_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing or undecodable file is a TaskResError that names it."""
    path = str(path)
    if not os.path.isfile(path):
        raise TaskResFileNotFoundError(f"image {path!r} does not exist; check the data folder (--data/--root) "
                                       "and the split "
                                       "file's paths, which are relative to it.")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        raise TaskResValueError(f"image {path!r} cannot be decoded ({err}); replace or remove the file, or pass "
                                "--skip-bad-images to leave such images out.") from None


class ImageViews(torch.utils.data.Dataset):
    """Transformed images for a list of paths; item = (index, pixels, error). ``error`` is "" for a good image; for
    a missing or undecodable one it is the message, and the pixels are zeros. The caller decides whether to raise,
    in the main process, so that the message reaches the user intact even from a worker process.

    ``seeds`` None: the test transform. Otherwise one seed per path for its train-transform draw.
    """

    def __init__(self, paths: Sequence[str], image_size: int, mean, std, seeds: Sequence[int] | None = None,
                 scale: tuple[float, float] = TRAIN_SCALE):
        self.paths, self.seeds, self.size = list(paths), None if seeds is None else list(seeds), image_size
        if self.seeds is not None and len(self.seeds) != len(self.paths):
            raise TaskResValueError(f"one seed per image: {len(self.seeds)} seeds for {len(self.paths)} paths.")
        self.transform = build_transform(image_size, mean, std, self.seeds is not None, scale)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_image(self.paths[i])
        except TaskResError as err:
            return i, torch.zeros(3, self.size, self.size), str(err)
        if self.seeds is None:
            return i, self.transform(img), ""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seeds[i])
            return i, self.transform(img), ""
