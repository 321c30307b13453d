"""How close the pipeline runs to its floors, measured side by side in one run, printed as a table.

    python scripts/benchmark.py [--images 300] [--epochs 200] [--device cpu] [--skip-extract] [--skip-train]
                                [--skip-online] [--online-epochs 30] [--startup-rounds 5]
                                [--only extraction|training|online|budget|startup|engines]
                                [--arch RN50|ViT-B-16] [--precision fp32|fp16|bf16] [--rounds 2]

Rows:
- **extraction**: a cold-cache ``taskres zeroshot`` over ``--images`` JPEGs (500 x 375) with an encoder (``--arch``,
  RN50 by default) of random weights saved as an OpenAI-format checkpoint, in ``--precision``, timed as a whole
  process, against a bare process that builds the same model from the same file and encodes as many preprocessed
  tensors at batch 32 (the encoder floor). The two are run alternately, ``--rounds`` times each; the table gives
  the faster of each. Target: ratio <= 1.10.
- **training**: 200 epochs of TaskRes on cached features for 1000 classes x 16 shots, D 1024, batch 256, against
  the bare matrix products of the same steps (forward B x D x C and the classifier's gradient C x B x D). Each
  epoch of ``fit`` is followed, inside the epoch callback, by one epoch of bare products, so both see the same
  machine state; the table gives the totals and the median per-epoch ratio. Target: ratio <= 1.5.
- **online views** (``--views online``, so ``--protocol official``): the demo model on the demo's new_shapes
  images, 16 shots (80 images), the encoder batch 32, ``--online-epochs`` epochs of ``OnlineViews`` (the decoding
  pool of a run, seeded draws), each followed by one epoch of a bare loop in this process that decodes, augments
  (RandomResizedCrop 0.08-1, bicubic, flip; unseeded) and encodes the same images at the same batch size. The table
  gives the cost per encoder pass of each and the median per-epoch ratio. Target: ratio <= 1.10. About a minute.
- **start-up**: the CPU time (user + sys) of ``taskres predict`` of one image with a finished run (the demo model,
  a generated ImageFolder) against ``python -c "import torch"``, whole processes, alternated, the median of
  ``--startup-rounds``. Target: ratio <= 2. Beside it, ``python -c "import open_clip"``: the floor of any process
  that builds an open_clip model.
- **encoder passes** (``budget``) of ``--preset paper-fewshot`` and ``--preset paper-dg`` on one backbone: every
  official code base in its own configuration (epochs, augmented views, test re-encodes per run) against one shared
  feature cache (each test split once, each drawn training image once per view of the bank), counted from the
  published split sizes; at 50 views (the default) and 20. docs/performance.md cites the configurations.
- **engines** (``--only engines``, minutes; never part of the whole run): the bare encoder, RN50 and ViT-B/16 of
  random weights at batch 32, eager PyTorch against channels-last, ONNX Runtime and ``torch.compile``: seconds a
  batch (alternated, median), the multiply-add rate against this CPU's peak (from /proc/cpuinfo), and the largest
  relative feature difference to eager.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from taskres.app.presets import preset
from taskres.data.benchmarks import get_benchmark

SHOTS, SEEDS = (1, 2, 4, 8, 16), (1, 2, 3)

BARE = """
import sys, time, torch
from open_clip.model import build_model_from_openai_state_dict
t0 = time.perf_counter()
model = build_model_from_openai_state_dict(torch.load(sys.argv[1], map_location="cpu")).float().eval()
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[sys.argv[4]]
model.to(sys.argv[3], dtype)
x = torch.randn(32, 3, 224, 224, device=sys.argv[3], dtype=dtype)
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


def extraction(images: int, device: str, rounds: int = 2, arch: str = "RN50", precision: str = "fp32") -> dict:
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = open_clip.create_model(f"{arch}-quickgelu", pretrained=None)
        weights = tmp / f"{arch}-random.pt"
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
            bare.append(
                _timed([sys.executable, str(tmp / "bare.py"), str(weights), str(images), device, precision], env)
            )
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
                        "--precision",
                        precision,
                        "--quiet",
                        "--out",
                        str(tmp / f"zs{r}"),
                    ],
                    env,
                )
            )
    return {"bare": min(bare), "ours": min(ours), "all_bare": bare, "all_ours": ours}


def training(device: str, epochs: int, classes: int = 1000) -> dict:
    from taskres.engine import OptimConfig, fit
    from taskres.methods.taskres import TaskResHead

    g = torch.Generator().manual_seed(0)
    shots, dim, batch = 16, 1024, 256
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


# ---- the whole grid's encoder budget ----------------------------------------------------------------------------
# Each official code base's image-encoder passes for one (dataset, shots, seed) run, as its public configuration
# runs it (docs/performance.md, "The whole grid's encoder budget", cites the files): the augmented passes of its
# training epochs, the augmented views it caches once per run, and the val and test images it encodes.


def _epoch_images(n: int, batch: int) -> int:
    """Images a Dassl epoch encodes: the partial batch is dropped when a full one exists."""
    return n - n % batch if n >= batch else n


def _coop_epochs(shots: int) -> int:  # CoOp's rn50_ep50 / rn50_ep100 / rn50 configs
    return 50 if shots == 1 else 100 if shots <= 4 else 200


def official_run(method: str, dataset: str, shots: int) -> tuple[int, int, int]:
    """(training passes, val passes, whether the test split is encoded: 1 or 0) of one official run."""
    spec = get_benchmark(dataset)
    classes, n = spec.published.classes, shots * spec.published.classes
    few_val = 0 if dataset == "imagenet" else min(shots, 4) * classes  # ImageNet draws no few-shot val
    if method in ("taskres", "taskres*"):  # online views, batch 256, 100/200 epochs, test after the last epoch
        return (100 if shots <= 4 else 200) * _epoch_images(n, 256), 0, 1
    if method in ("coop", "clip-adapter"):  # online views, batch 32; CoOp runs ImageNet with rn50_ep50
        epochs = 50 if method == "coop" and dataset == "imagenet" else _coop_epochs(shots)
        return epochs * _epoch_images(n, 32), 0, 1
    if method == "tip-adapter-f":  # a cache of 10 augmented epochs, then 20 (EuroSAT 100) re-encoded epochs
        return (10 + (100 if dataset == "eurosat" else 20)) * n, few_val, 1
    if method in ("zs-lp", "clap"):  # a pool of 20 augmented views of the support set, encoded once per run
        return 20 * n, 0, 1
    if method == "lp++":  # one augmented view per task, a K-shot val; the test split once per process (below)
        return n, 0 if dataset == "imagenet" else shots * classes, 0
    raise KeyError(method)


def official_grid(
    methods: Sequence[str], datasets: Sequence[str], shots: Sequence[int], seeds: int, eval_on: Sequence[str] = ()
) -> dict[str, int]:
    """Passes of the official code bases over a grid, per method (zero-shot: once per dataset)."""
    totals: dict[str, int] = {"zero-shot": 0}
    for dataset in datasets:
        pub = get_benchmark(dataset).published
        tests = pub.test + sum(get_benchmark(v).published.test for v in eval_on)  # each run evaluates them all
        totals["zero-shot"] += tests  # CoOp's zero-shot evaluation, once per dataset
        for method in methods:
            if method == "linear-probe":  # lpclip: whole train, val and test splits once per dataset
                val = pub.val if pub.val is not None else pub.test  # CoOp's ImageNet aliases val to test
                totals[method] = totals.get(method, 0) + (pub.train or 0) + val + tests
                continue
            for k in shots:
                train, val, test = official_run(method, dataset, k)
                once = tests if method == "lp++" else 0  # LP++ encodes the test split once per process
                totals[method] = totals.get(method, 0) + seeds * (train + val + test * tests) + once
    return totals


def ours_grid(
    methods: Sequence[str],
    datasets: Sequence[str],
    shots: Sequence[int],
    seeds: int,
    views: int,
    eval_on: Sequence[str] = (),
) -> int:
    """Passes of one shared feature cache: each test split once, every drawn val image once (test transform), every
    drawn training image once per view of the bank and once with the test transform (the probes' view 0). Draws of
    different seeds and shot counts are counted as if they never overlapped (an upper bound), capped by the split."""
    bank = max(views if m not in ("linear-probe", "zs-lp", "clap", "lp++") else 0 for m in methods)
    if any(m in ("zs-lp", "clap") for m in methods):
        bank = max(bank, 20)  # their pool of 20 views, the bank's first 20
    test_view = 1 if "linear-probe" in methods else 0
    total = 0
    for dataset in datasets:
        pub = get_benchmark(dataset).published
        drawn = min(seeds * sum(shots) * pub.classes, pub.train or 0)
        val = 0 if pub.val is None else min(seeds * sum(min(k, 4) for k in shots) * pub.classes, pub.val)
        total += pub.test + sum(get_benchmark(v).published.test for v in eval_on) + val + drawn * (bank + test_view)
    return total


def budget_rows(name: str, views: Sequence[int] = (50, 20)) -> list[tuple[str, str, str, str]]:
    """The encoder passes of ``--preset name`` (one backbone): each official code base's, and one shared cache's."""
    grid = preset(name, root="benchmarks", backbones=())
    args = ([d.name for d in grid.datasets], grid.shots, len(grid.seeds))
    official = official_grid(grid.methods, *args, eval_on=grid.eval_on)
    total = sum(official.values())
    rows = [(f"encoder passes, --preset {name}, one backbone", f"{total:,} official, all methods", "", "")]
    rows += [(f"  official {method}", f"{passes:,}", "", "") for method, passes in official.items()]
    for v in views:
        ours = ours_grid(grid.methods, *args, views=v, eval_on=grid.eval_on)
        rows.append((f"  ours, one cache, {v} views", f"{ours:,}", f"{total / ours:.1f}x fewer", ""))
    return rows


def _cpu_seconds(cmd: list[str]) -> float:
    """user + sys CPU seconds of one whole child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def startup(rounds: int) -> dict:
    """CPU time of ``taskres predict`` of one image with a finished run (the demo backbone, a generated 3-class
    ImageFolder) against ``python -c "import torch"``, whole processes, alternated."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for split in ("train", "test"):
            for name in ("cat", "dog", "fish"):
                folder = tmp / "data" / split / name
                folder.mkdir(parents=True)
                for i in range(3):
                    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        taskres = [sys.executable, "-m", "taskres"]
        subprocess.run([*taskres, "train", "--data", str(tmp / "data"), "--backbone", "taskres-demo", "--shots", "2",
                        "--seed", "1", "--epochs", "2", "--no-cache", "--quiet", "--device", "cpu", "--out",
                        str(tmp / "run")], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        predict = [*taskres, "predict", "--run", str(tmp / "run"), str(tmp / "data" / "test" / "cat" / "0.jpg"),
                   "--no-cache", "--quiet", "--device", "cpu"]  # fmt: skip
        torch_only, ours, open_clip = [], [], []
        for _ in range(rounds):
            torch_only.append(_cpu_seconds([sys.executable, "-c", "import torch"]))
            ours.append(_cpu_seconds(predict))
            open_clip.append(_cpu_seconds([sys.executable, "-c", "import open_clip"]))
    return {"torch": statistics.median(torch_only), "ours": statistics.median(ours), "all_torch": torch_only,
            "all_ours": ours, "open_clip": statistics.median(open_clip), "all_open_clip": open_clip}  # fmt: skip


def startup_rows(rounds: int) -> list[tuple[str, str, str, str]]:
    st = startup(rounds)
    every = " ".join(f"{o:.1f}/{t:.1f}" for o, t in zip(st["all_ours"], st["all_torch"]))
    return [
        (f"start-up: taskres predict, 1 image, CPU time, median of {rounds}",
         f"{st['ours']:.2f} s vs {st['torch']:.2f} s (import torch)", f"{st['ours'] / st['torch']:.2f}", "<= 2"),
        ("  every round (predict / import torch, s)", every, "", ""),
        # the floor of any process that builds an open_clip model: open_clip imports torchvision (and through its
        # ops torch._dynamo) and timm at module level
        ("  python -c 'import open_clip', CPU time, median", f"{st['open_clip']:.2f} s",
         f"{st['open_clip'] / st['torch']:.2f}", ""),
    ]  # fmt: skip


# ---- the CPU encoder against the machine's peak -------------------------------------------------------------------
# fp32 multiply-adds a cycle a core: two 256-bit FMA pipes (AMD Zen 2-4, Intel since Haswell) hold 2 x 8; AVX-512
# with two FMA units doubles it. One pass of a bare encoder is compared with cores x clock x that.


def peak_gmacs() -> tuple[float, str]:
    """(the CPU's fp32 peak in GMAC/s, how it was computed) from /proc/cpuinfo (Linux)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    mhz = next((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), 0.0)
    lanes = 32 if "avx512f" in flags else 16 if "fma" in flags else 8
    cores = os.cpu_count() or 1
    return cores * mhz / 1e3 * lanes, f"{cores} cores x {mhz / 1e3:.3f} GHz x {lanes} fp32 MAC/cycle"


def _onnx_encoder(model: torch.nn.Module, x: torch.Tensor):
    import onnxruntime

    from taskres.export_formats import quiet_exporters

    class Images(torch.nn.Module):
        def __init__(self, clip: torch.nn.Module):
            super().__init__()
            self.clip = clip

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_image(pixels)

    with quiet_exporters(), torch.no_grad():
        program = torch.onnx.export(Images(model), (x,), input_names=["image"], dynamo=True, verbose=False)
    assert program is not None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options, ["CPUExecutionProvider"])
    return lambda t: torch.from_numpy(session.run(None, {"image": t.numpy()})[0])


def engines(arch: str, rounds: int) -> dict:
    """Seconds per batch of 32 (random weights, random pixels) of the eager encoder and each alternative, run in
    turn ``rounds`` times; the largest relative feature difference to eager; the MACs of one batch."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return open_clip.create_model(f"{arch}-quickgelu", pretrained=None).float().eval()

    model = build()
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_image(x)
    last = build().to(memory_format=torch.channels_last)
    run = {
        "eager": model.encode_image,
        "channels-last": lambda t: last.encode_image(t.contiguous(memory_format=torch.channels_last)),
        "onnxruntime": _onnx_encoder(model, x),
        "torch.compile": torch.compile(build().encode_image),
    }
    with torch.no_grad():
        ref = model.encode_image(x)
        diff = {k: ((f(x) - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item() for k, f in run.items()}  # warm-up
        times: dict[str, list[float]] = {k: [] for k in run}
        for _ in range(rounds):
            for k, f in run.items():
                t = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t)
    return {"macs": counter.get_total_flops() / 2, "times": times, "diff": diff}


def engine_rows(arch: str, rounds: int) -> list[tuple[str, str, str, str]]:
    e = engines(arch, rounds)
    peak, how = peak_gmacs()
    eager = statistics.median(e["times"]["eager"])
    rows = [(f"encoder {arch}, batch 32: {e['macs'] / 32e9:.2f} GMAC/image; peak {peak:.1f} GMAC/s", how, "", "")]
    for name, times in e["times"].items():
        med = statistics.median(times)
        rows.append(
            (f"  {name}: {med:.2f} s/batch (median of {rounds}), max rel diff {e['diff'][name]:.1e}",
             f"{e['macs'] / med / 1e9:.1f} GMAC/s = {e['macs'] / med / 1e9 / peak:.0%} of peak",
             f"{eager / med:.2f}x", ">= 1.3x, <= 1e-4")
        )  # fmt: skip
    return rows


def extraction_rows(
    images: int, device: str, arch: str = "RN50", precision: str = "fp32", rounds: int = 2
) -> list[tuple[str, str, str, str]]:
    e = extraction(images, device, rounds, arch=arch, precision=precision)
    every = " ".join(f"{o:.1f}/{b:.1f}" for o, b in zip(e["all_ours"], e["all_bare"]))
    return [
        (f"extraction, {arch} {precision}, {images} JPEGs, whole process", f"{e['ours']:.1f} s vs {e['bare']:.1f} s",
         f"{e['ours'] / e['bare']:.3f}", "<= 1.10"),
        ("  every round (ours / bare, s)", every, "", ""),
    ]  # fmt: skip


def training_rows(device: str, epochs: int, classes: int = 1000) -> list[tuple[str, str, str, str]]:
    t = training(device, epochs, classes)
    return [
        (f"training, TaskRes {epochs} ep x {t['steps']} steps, {classes * 16} x 1024, {classes} cls",
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
    parser.add_argument("--train-classes", type=int, default=1000, help="training: classes (16 shots each)")
    parser.add_argument("--online-workers", type=int, default=None, help="decoding processes (default: auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", choices=("RN50", "ViT-B-16"), default="RN50", help="extraction: the encoder")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="extraction")
    parser.add_argument("--skip-extract", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-online", action="store_true")
    parser.add_argument("--startup-rounds", type=int, default=5)
    parser.add_argument("--engine-rounds", type=int, default=5, help="engines: alternated batches of each")
    parser.add_argument("--rounds", type=int, default=2, help="extraction: alternated rounds of each process")
    parser.add_argument(
        "--only", choices=("extraction", "training", "online", "budget", "startup", "engines"), default=None
    )
    args = parser.parse_args()
    run = {
        "extraction": not args.skip_extract and args.only in (None, "extraction"),
        "training": not args.skip_train and args.only in (None, "training"),
        "online": not args.skip_online and args.only in (None, "online"),
    }
    rows = [("machine", f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads", "", "")]
    if run["extraction"]:
        rows += extraction_rows(args.images, args.device, args.arch, args.precision, args.rounds)
    if run["training"]:
        rows += training_rows(args.device, args.epochs, args.train_classes)
    if run["online"]:
        rows += online_rows(args.device, args.online_epochs, args.online_workers)
    if args.only == "engines":  # minutes (two encoders, torch.compile's first call): asked for by name only
        rows += engine_rows("RN50", args.engine_rounds) + engine_rows("ViT-B-16", args.engine_rounds)
    if args.only in (None, "startup"):
        rows += startup_rows(args.startup_rounds)
    if args.only in (None, "budget"):
        rows += budget_rows("paper-fewshot") + budget_rows("paper-dg")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(
        f"{'what':<{widths[0]}}  {'figure':<{widths[1]}}  {'ratio':>{max(widths[2], 5)}}  target   (device "
        f"{args.device})"
    )
    for what, fig, ratio, target in rows:
        print(f"{what:<{widths[0]}}  {fig:<{widths[1]}}  {ratio:>{max(widths[2], 5)}}  {target}")


if __name__ == "__main__":
    main()
