"""Cost of the pieces of a TaskRes run on this machine, printed as a table.

    python scripts/benchmark.py [--images 96] [--device cpu] [--skip-train]

Rows: feature extraction through the real path (JPEG decode, CLIP test transform, image encoder) for RN50 and
ViT-B/16 with random weights at batch 32, the image encoder alone on the same batches, and 200 epochs of TaskRes on
cached features for an ImageNet-sized problem (16 shots x 1000 classes, D = 1024, batch 256).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from taskres.backbones import Backbone, BackboneIdentity
from taskres.cache import FeatureCache
from taskres.engine import OptimConfig, fit
from taskres.methods.taskres import TaskResHead


def random_backbone(name: str, device: str) -> Backbone:
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).to(device).eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    identity = BackboneIdentity(spec=name, kind="random", arch=name, sha256="random-init", image_size=int(size))
    return Backbone(model, open_clip.get_tokenizer(name), int(size), identity, device=torch.device(device))


def extraction(name: str, paths: list[Path], device: str) -> tuple[float, float]:
    backbone = random_backbone(name, device)
    cache = FeatureCache(None, batch_size=32, quiet=True)
    cache.features(backbone, paths[:32])  # warm-up
    t = time.perf_counter()
    cache.features(backbone, paths)
    full = len(paths) / (time.perf_counter() - t)
    x = torch.randn(32, 3, backbone.image_size, backbone.image_size)
    t = time.perf_counter()
    n = 0
    while n < len(paths):
        backbone.encode_images(x)
        n += 32
    encoder = n / (time.perf_counter() - t)
    return full, encoder


def training(device: str, epochs: int = 200) -> float:
    g = torch.Generator().manual_seed(0)
    classes, shots, dim = 1000, 16, 1024
    base = torch.randn(classes, dim, generator=g)
    feats = torch.randn(classes * shots, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(shots)
    head = TaskResHead(base, 100.0)
    t = time.perf_counter()
    fit(head, feats, labels, OptimConfig(lr=2e-4, epochs=epochs, batch_size=256), seed=1, device=device, quiet=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    rows = [("torch threads", str(torch.get_num_threads()), "")]
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):
            p = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(p, quality=90)
            paths.append(p)
        for name in ("RN50-quickgelu", "ViT-B-16-quickgelu"):
            full, enc = extraction(name, paths, args.device)
            rows.append((f"extract {name}, batch 32", f"{full:.1f} img/s", f"encoder alone {enc:.1f} img/s"))
    if not args.skip_train:
        seconds = training(args.device)
        rows.append(("TaskRes 200 epochs, 16k x 1024, 1000 cls", f"{seconds:.1f} s",
                     f"{seconds / 200 * 1000:.0f} ms/epoch, 62 steps/epoch"))
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'figure':>14}  notes  (device {args.device})")
    for what, fig, note in rows:
        print(f"{what:<{width}}  {fig:>14}  {note}")


if __name__ == "__main__":
    main()
