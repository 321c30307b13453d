"""Offline fixtures: tiny CLIP checkpoints written by the tests and small generated image datasets."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_RN = dict(
    embed_dim=32,
    vision_cfg=dict(layers=[1, 1, 1, 1], width=8, image_size=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=1, layers=1),
)
TINY_VIT = dict(
    embed_dim=32,
    vision_cfg=dict(layers=1, width=64, patch_size=8, image_size=32),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=1, layers=1),
)


def tiny_clip(cfg: dict, seed: int = 0, quick_gelu: bool = True):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(
        cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=quick_gelu
    )
    return model.eval()


@pytest.fixture(scope="session")
def openai_rn_file(tmp_path_factory) -> Path:
    """A tiny ModifiedResNet CLIP saved as a plain OpenAI-layout state dict (fp16, as OpenAI's)."""
    path = tmp_path_factory.mktemp("weights") / "tiny-rn.pt"
    torch.save({k: v.half() for k, v in tiny_clip(TINY_RN).state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def openai_vit_jit_file(tmp_path_factory) -> Path:
    """A tiny ViT CLIP saved as a TorchScript archive, the format OpenAI distributes."""
    path = tmp_path_factory.mktemp("weights") / "tiny-vit-jit.pt"
    torch.jit.save(trace_clip(tiny_clip(TINY_VIT, seed=1)), str(path))
    return path


def trace_clip(model):
    images = torch.ones(2, 3, 32, 32)
    text = torch.zeros(2, model.context_length, dtype=torch.int)
    return torch.jit.trace_module(model, dict(forward=(images, text), encode_text=(text,), encode_image=(images,)))


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _image(colour, rng: np.random.Generator, size: int = 40) -> Image.Image:
    base = np.array(colour, dtype=np.float32)
    arr = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_split_dataset(
    root: Path, n_train: int = 6, n_val: int = 3, n_test: int = 4, seed: int = 0, names=("red", "green", "blue")
) -> tuple[Path, Path]:
    """images/<split>/<class>_<i>.png and split_zhou_Tiny.json with [path, label, classname] entries."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images"
    splits = {"train": [], "val": [], "test": []}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        (image_dir / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            for label, name in enumerate(names):  # interleaved, so first-appearance order is exercised
                rel = f"{split}/{name}_{i}.png"
                _image(COLOURS[name], rng).save(image_dir / rel)
                splits[split].append([rel, label, name])
    split_file = root / "split_zhou_Tiny.json"
    split_file.write_text(json.dumps(splits))
    return image_dir, split_file


def make_image_folder(root: Path, n_train: int = 5, n_test: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, colour in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(colour, rng).save(d / f"{i}.jpg")
    return root


@pytest.fixture()
def split_dataset(tmp_path) -> tuple[Path, Path]:
    return make_split_dataset(tmp_path / "tiny")


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "folder")


@pytest.fixture()
def env(tmp_path, split_dataset, openai_rn_file):
    """(tmp folder, the common CLI arguments for the generated split-file dataset, its image folder)."""
    image_dir, split_file = split_dataset
    base = [
        "--data",
        str(image_dir),
        "--split-file",
        str(split_file),
        "--backbone",
        str(openai_rn_file),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--device",
        "cpu",
    ]
    return tmp_path, base, image_dir


def run_cli(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from taskres.app.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def fit_context(train_views, train_labels, val_features=None, val_labels=None, **kw):
    """A FitContext over the given training views and few-shot val split (and an empty test split: a fit is shown
    none outside the official protocol); ``kw``: the other FitContext fields."""
    from taskres.features import Features
    from taskres.methods.base import FitContext

    empty_test = torch.zeros(0, kw["base"].shape[1]), torch.zeros(0, dtype=torch.long)
    features = Features(train_views, train_labels, val_features, val_labels, *empty_test)
    return FitContext(features=features, **kw)


def cluster_context(c=3, d=16, shots=8, views=3, val=4, seed=0, **kw):
    """A FitContext over class clusters in feature space, with a base classifier that is a noisy view of the cluster
    centres (what the method tests train on)."""
    from taskres.engine import OptimConfig

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 2
    labels = torch.arange(c).repeat_interleave(shots)
    train = torch.stack([centres[labels] + torch.randn(len(labels), d, generator=g) for _ in range(views)])
    val_labels = torch.arange(c).repeat_interleave(val)
    val_feats = centres[val_labels] + torch.randn(len(val_labels), d, generator=g)
    base = centres + 2.0 * torch.randn(c, d, generator=g)
    defaults = dict(
        base=base,
        logit_scale=100.0,
        train_views=train,
        train_labels=labels,
        val_features=val_feats,
        val_labels=val_labels,
        optim=OptimConfig(lr=1e-2, epochs=5, batch_size=8),
        seed=seed,
        shots=shots,
        classnames=[f"c{i}" for i in range(c)],
        templates=["a photo of a {}."],
        quiet=True,
    )
    return fit_context(**{**defaults, **kw})


@pytest.fixture(scope="module")
def tiny(openai_rn_file):
    """The tiny OpenAI-format RN backbone, loaded once per test module."""
    from taskres.backbones import load_backbone

    return load_backbone(str(openai_rn_file))


def encode_texts(backbone, texts):
    """The backbone's text embeddings of ``texts``, float32, without autograd."""
    with torch.no_grad():
        return backbone.model.encode_text(backbone.tokenizer(texts)).float()


def write_pngs(folder: Path, n: int = 4) -> list[Path]:
    """``n`` random 34 x 30 RGB PNGs in ``folder`` (created): 0.png, 1.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (30, 34, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture()
def full_disk(monkeypatch):
    """``fill(folder, code=ENOSPC, names="")``: from now on a write into a file under ``folder`` whose name holds
    ``names`` fails as the kernel reports a full disk (or quota), after the file was created: what a file system
    with free inodes and no free blocks does. Files under other folders are written as usual."""
    real_write, real_pwrite = os.write, os.pwrite

    def fill(folder: Path, code: int = errno.ENOSPC, names: str = "") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        root = str(folder.resolve()) + os.sep

        def refuse(fd):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if target.startswith(root) and names in os.path.basename(target):
                raise OSError(code, os.strerror(code))

        def write(fd, data):
            refuse(fd)
            return real_write(fd, data)

        def pwrite(fd, data, offset):
            refuse(fd)
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "pwrite", pwrite)
        return folder

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    return fill
