"""How close the pipeline runs to its floors, measured side by side in one run, printed as a table.

    python scripts/benchmark.py [--images 300] [--epochs 200] [--device cpu] [--skip-extract] [--skip-train]
                                [--skip-online] [--only extraction|training|online] [--online-epochs 30]

Rows:
- **extraction**: a cold-cache ``taskres zeroshot`` over ``--images`` JPEGs (500 x 375) with an RN50 of random
  weights saved as an OpenAI-format checkpoint, timed as a whole process, against a bare process that builds the
  same model from the same file and encodes as many preprocessed tensors at batch 32 (the encoder floor). The two
  are run alternately, twice each; the table gives the faster of each. Target: ratio <= 1.10.
- **training**: 200 epochs of TaskRes on cached features for 1000 classes x 16 shots, D 1024, batch 256, against
  the bare matrix products of the same steps (forward B x D x C and the classifier's gradient C x B x D). Each
  epoch of ``fit`` is followed, inside the epoch callback, by one epoch of bare products, so both see the same
  machine state; the table gives the totals and the median per-epoch ratio. Target: ratio <= 1.5.
- **online views** (``--views online``, so ``--protocol official``): the demo model on the demo's new_shapes
  images, 16 shots (80 images), the encoder batch 32, ``--online-epochs`` epochs of ``OnlineViews`` (the decoding
  pool of a run, seeded draws), each followed by one epoch of a bare loop in this process that decodes, augments
  (RandomResizedCrop 0.08-1, bicubic, flip; unseeded) and encodes the same images at the same batch size. The table
  gives the cost per encoder pass of each and the median per-epoch ratio. Target: ratio <= 1.10. About a minute.
- **encoder passes** of the paper's few-shot benchmark (11 datasets, 1/2/4/8/16 shots, 3 seeds, one backbone):
  the official trainer encodes every training image of every epoch of every run, plus the test split per run;
  this tool encodes the test split once per dataset, and each drawn image's views once (an upper bound: draws of
  different seeds and shot counts are counted as if they never overlapped). Counted from the dataset sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# (classes, test images) of the 11 benchmarks, as CoOp's split files give them (Zhou et al., IJCV 2022, Table 7).
BENCHMARKS = {
    "imagenet": (1000, 50000),
    "caltech101": (100, 2465),
    "oxford_pets": (37, 3669),
    "stanford_cars": (196, 8041),
    "oxford_flowers": (102, 2463),
    "food101": (101, 30300),
    "fgvc_aircraft": (100, 3333),
    "sun397": (397, 19850),
    "dtd": (47, 1692),
    "eurosat": (10, 8100),
    "ucf101": (101, 3783),
}
SHOTS, SEEDS = (1, 2, 4, 8, 16), (1, 2, 3)

BARE = """
import sys, time, torch
from open_clip.model import build_model_from_openai_state_dict
t0 = time.perf_counter()
model = build_model_from_openai_state_dict(torch.load(sys.argv[1], map_location="cpu")).float().eval()
model.to(sys.argv[3])
x = torch.randn(32, 3, 224, 224, device=sys.argv[3])
n, total = 0, int(sys.argv[2])
with torch.no_grad():
    while n < total:
        model.encode_image(x[: min(32, total - n)])
        n += 32
if sys.argv[3].startswith("cuda"):
    torch.cuda.synchronize()
"""


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def extraction(images: int, device: str, rounds: int = 2) -> dict:
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = open_clip.create_model("RN50-quickgelu", pretrained=None)
        weights = tmp / "RN50-random.pt"
        torch.save({k: v.half() for k, v in model.state_dict().items()}, weights)  # fp16, as OpenAI ships it
        del model
        rng = np.random.default_rng(0)
        classes = ("cat", "dog", "bird", "fish")
        for i in range(images):
            folder = tmp / "data" / "test" / classes[i % len(classes)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
        for name in classes:  # an ImageFolder needs a train split too; zero-shot reads only test
            (tmp / "data" / "train" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(
                tmp / "data" / "train" / name / "0.jpg", quality=90
            )
        (tmp / "bare.py").write_text(textwrap.dedent(BARE))
        env = dict(os.environ)
        bare, ours = [], []
        for r in range(rounds):
            bare.append(_timed([sys.executable, str(tmp / "bare.py"), str(weights), str(images), device], env))
            cache = tmp / f"cache{r}"  # cold every time
            ours.append(
                _timed(
                    [
                        sys.executable,
                        "-m",
                        "taskres",
                        "zeroshot",
                        "--data",
                        str(tmp / "data"),
                        "--backbone",
                        str(weights),
                        "--cache-dir",
                        str(cache),
                        "--device",
                        device,
                        "--quiet",
                        "--out",
                        str(tmp / f"zs{r}"),
                    ],
                    env,
                )
            )
    return {"bare": min(bare), "ours": min(ours), "all_bare": bare, "all_ours": ours}


def training(device: str, epochs: int) -> dict:
    from taskres.engine import OptimConfig, fit
    from taskres.methods.taskres import TaskResHead

    g = torch.Generator().manual_seed(0)
    classes, shots, dim, batch = 1000, 16, 1024, 256
    base = torch.randn(classes, dim, generator=g)
    feats = torch.randn(classes * shots, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(shots)
    steps = classes * shots // batch  # drop_last: 62 full batches
    w = torch.randn(classes, dim, device=device)
    grads = torch.randn(batch, classes, device=device)
    x_all = feats.to(device)
    bare_times, ours_times = [], []
    mark = [time.perf_counter()]

    def bare_epoch(record: dict) -> None:
        ours_times.append(time.perf_counter() - mark[0])
        t = time.perf_counter()
        for s in range(steps):
            x = x_all[s * batch : (s + 1) * batch]
            x @ w.t()  # forward (B, C)
            grads.t() @ x  # the classifier's gradient (C, D)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        bare_times.append(time.perf_counter() - t)
        mark[0] = time.perf_counter()

    head = TaskResHead(base, 100.0)
    fit(
        head,
        feats,
        labels,
        OptimConfig(lr=2e-4, epochs=epochs, batch_size=batch),
        seed=1,
        device=device,
        quiet=True,
        on_epoch=bare_epoch,
    )
    ratios = [o / b for o, b in zip(ours_times, bare_times)]
    return {"ours": sum(ours_times), "bare": sum(bare_times), "median_ratio": statistics.median(ratios), "steps": steps}


def online(device: str, epochs: int, workers: int | None = None) -> dict:
    from taskres.backbones import load_backbone
    from taskres.data.images import build_transform, read_image
    from taskres.demo.synthetic import write_demo_tasks
    from taskres.views import OnlineViews

    backbone = load_backbone("taskres-demo", device=device)
    with tempfile.TemporaryDirectory() as tmp:
        task = write_demo_tasks(Path(tmp), tasks=["new_shapes"])[0]
        split = json.loads(Path(task["split_file"]).read_text())["train"]
        names = [n for label in sorted({e[1] for e in split}) for n in [e[0] for e in split if e[1] == label][:16]]
        paths = [str(Path(task["image_dir"]) / n) for n in names]
        views = OnlineViews(backbone, paths, names, seed=1, batch_size=32, workers=workers)
        transform = build_transform(backbone.image_size, backbone.mean, backbone.std, augment=True)
        ours, bare = [], []
        for epoch in range(epochs + 1):  # epoch 0 starts the pool and warms both up: not counted
            t = time.perf_counter()
            views.epoch(epoch)
            _sync(device)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            for start in range(0, len(paths), 32):
                pixels = torch.stack([transform(read_image(p)) for p in paths[start : start + 32]])
                backbone.encode_images(pixels).cpu()
            _sync(device)
            if epoch:
                ours.append(t_ours)
                bare.append(time.perf_counter() - t)
        pool = views._pool
        views.close()
    ratios = [o / b for o, b in zip(ours, bare)]
    workers_used = getattr(pool, "num_workers", 0)
    passes = epochs * len(paths)
    return {
        "ours": sum(ours) / passes,
        "bare": sum(bare) / passes,
        "median_ratio": statistics.median(ratios),
        "images": len(paths),
        "workers": workers_used,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encoder_passes(views: int = 50) -> tuple[int, int]:
    """(official, ours) image-encoder passes for the few-shot benchmark grid on one backbone."""
    official = ours = 0
    for classes, test in BENCHMARKS.values():
        ours += test
        for shots in SHOTS:
            epochs = 100 if shots <= 4 else 200  # TaskRes's configs
            n = shots * classes
            per_epoch = n - n % 256 if n >= 256 else n  # Dassl drops the partial batch when a full one exists
            official += len(SEEDS) * (epochs * per_epoch + test)
            ours += len(SEEDS) * (views * n + min(shots, 4) * classes)
    return official, ours


def extraction_rows(images: int, device: str) -> list[tuple[str, str, str, str]]:
    e = extraction(images, device)
    every = " ".join(f"{o:.1f}/{b:.1f}" for o, b in zip(e["all_ours"], e["all_bare"]))
    return [
        (f"extraction, RN50, {images} JPEGs, whole process", f"{e['ours']:.1f} s vs {e['bare']:.1f} s",
         f"{e['ours'] / e['bare']:.3f}", "<= 1.10"),
        ("  every round (ours / bare, s)", every, "", ""),
    ]  # fmt: skip


def training_rows(device: str, epochs: int) -> list[tuple[str, str, str, str]]:
    t = training(device, epochs)
    return [
        (f"training, TaskRes {epochs} ep x {t['steps']} steps, 16k x 1024, 1000 cls",
         f"{t['ours']:.1f} s vs {t['bare']:.1f} s", f"{t['ours'] / t['bare']:.3f}", "<= 1.5"),
        ("  median per-epoch ratio", "", f"{t['median_ratio']:.3f}", ""),
    ]  # fmt: skip


def online_rows(device: str, epochs: int, workers: int | None) -> list[tuple[str, str, str, str]]:
    o = online(device, epochs, workers)
    return [
        (f"online views, demo, {o['images']} images x {epochs} ep, batch 32, {o['workers']} worker(s)",
         f"{o['ours'] * 1e3:.2f} vs {o['bare'] * 1e3:.2f} ms/pass", f"{o['ours'] / o['bare']:.3f}", "<= 1.10"),
        ("  median per-epoch ratio", "", f"{o['median_ratio']:.3f}", ""),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--online-epochs", type=int, default=30)
    parser.add_argument("--online-workers", type=int, default=None, help="decoding processes (default: auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-online", action="store_true")
    parser.add_argument("--only", choices=("extraction", "training", "online"), default=None)
    args = parser.parse_args()
    run = {
        "extraction": not args.skip_extract and args.only in (None, "extraction"),
        "training": not args.skip_train and args.only in (None, "training"),
        "online": not args.skip_online and args.only in (None, "online"),
    }
    rows = [("machine", f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads", "", "")]
    if run["extraction"]:
        rows += extraction_rows(args.images, args.device)
    if run["training"]:
        rows += training_rows(args.device, args.epochs)
    if run["online"]:
        rows += online_rows(args.device, args.online_epochs, args.online_workers)
    if args.only is None:
        official, ours = encoder_passes()
        rows.append(
            (
                "encoder passes, 11 datasets x 5 shots x 3 seeds",
                f"{official:,} official vs {ours:,} ours (V=50)",
                f"{official / ours:.1f}x fewer",
                "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(
        f"{'what':<{widths[0]}}  {'figure':<{widths[1]}}  {'ratio':>{max(widths[2], 5)}}  target   (device "
        f"{args.device})"
    )
    for what, fig, ratio, target in rows:
        print(f"{what:<{widths[0]}}  {fig:<{widths[1]}}  {ratio:>{max(widths[2], 5)}}  {target}")


if __name__ == "__main__":
    main()
