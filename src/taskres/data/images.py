"""Reading images and CLIP's transforms (docs/protocol.md#images-and-transforms), with reproducible augmented views.

View ``None`` is the test transform: resize the shorter side to the model's size (bicubic), centre crop, normalise.
View ``v >= 0`` is the train transform (RandomResizedCrop scale (0.08, 1), bicubic, horizontal flip, normalise) drawn
from a generator seeded by (view, image path): the same view of the same image is the same pixels on every run and
in every worker, and different views differ.
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


def transform_spec(image_size: int, mean: Sequence[float], std: Sequence[float], view: int | None) -> dict:
    """Everything about a transform that changes the pixels, for cache keys."""
    spec = {"size": image_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic"}
    if view is None:
        return {**spec, "kind": "test", "resize": "shorter_side", "crop": "center"}
    return {**spec, "kind": "train", "crop": "random_resized", "scale": [0.08, 1.0], "flip": 0.5, "view": view}


def build_transform(image_size: int, mean: Sequence[float], std: Sequence[float], view: int | None) -> T.Compose:
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if view is None:
        return T.Compose([T.Resize(image_size, interpolation=BICUBIC), T.CenterCrop(image_size), *normalize])
    return T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=BICUBIC),
                      T.RandomHorizontalFlip(), *normalize])


def view_seed(view: int, path: str) -> int:
    """Seed of view ``view`` of an image, from its absolute path (as the cache key), however it was spelled."""
    key = f"{view}|{os.path.abspath(path)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


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
    in the main process, so that the message reaches the user intact even from a worker process."""

    def __init__(self, paths: Sequence[str], image_size: int, mean, std, view: int | None):
        self.paths, self.view, self.size = list(paths), view, image_size
        self.transform = build_transform(image_size, mean, std, view)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_image(self.paths[i])
        except TaskResError as err:
            return i, torch.zeros(3, self.size, self.size), str(err)
        if self.view is None:
            return i, self.transform(img), ""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.view, self.paths[i]))
            return i, self.transform(img), ""
