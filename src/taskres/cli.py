"""The ``taskres`` command: parses arguments, calls the library, prints. User errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from taskres.errors import TaskResError

CACHE_ENV = "TASKRES_CACHE"


def _default_cache() -> str:
    return os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "taskres" / "features")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _common(p: argparse.ArgumentParser, data: bool = True, backbone: bool = True) -> None:
    if data:
        p.add_argument("--data", help="dataset image folder (split-file paths are relative to it), or an ImageFolder "
                                       "root with train/<class>/ and test/<class>/")
        p.add_argument("--split-file", help="CoOp split JSON (split_zhou_<Name>.json); omit for an ImageFolder")
        p.add_argument("--dataset", help="a benchmark by its CoOp config name (see `taskres datasets`), with --root")
        p.add_argument("--root", help="the folder holding CoOp's dataset folders (with --dataset)")
        p.add_argument("--template", action="append", default=None,
                       help="prompt template with {} (repeatable); default 'a photo of a {}.'")
        p.add_argument("--skip-bad-images", action="store_true", help="skip undecodable images (counted in metrics)")
    if backbone:
        p.add_argument("--backbone", required=True, help="RN50, RN101, ViT-B/32, ViT-B/16, RN50x16, taskres-demo, an "
                                                         "open_clip MODEL:PRETRAINED pair, or a checkpoint path")
        p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                       help="backbone precision for encoding (default fp32, as the protocol)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", default=None, help=f"feature cache folder (default ${CACHE_ENV} or "
                                                     "~/.cache/taskres/features)")
    p.add_argument("--no-cache", action="store_true", help="encode without reading or writing the feature cache")
    p.add_argument("--weights-dir", default=None, help="folder with backbone weight files (default $TASKRES_WEIGHTS "
                                                       "or ~/.cache/taskres/weights)")
    p.add_argument("--encode-batch-size", type=int, default=32, help="images per encoder batch (default 32)")
    p.add_argument("--workers", type=int, default=0, help="image-loading worker processes (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskres", description="Task Residual tuning of CLIP on cached features.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy of the text classifier")
    _common(p)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")

    p = sub.add_parser("train", help="train a task residual on K shots per class")
    _common(p)
    p.add_argument("--shots", type=int, required=True, help="K, training images per class")
    p.add_argument("--seed", type=int, required=True, help="seed of the few-shot draw and of training")
    p.add_argument("--method", default="taskres", help="method (default taskres)")
    p.add_argument("--alpha", type=float, default=0.5, help="residual scale alpha (default 0.5; 1.0 for Flowers102)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3; 2e-4 for ImageNet)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 100 for K <= 4, 200 for K >= 8)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="Adam L2 weight decay (default 5e-4)")
    p.add_argument("--views", type=int, default=10,
                   help="augmented views per training image to encode; 0 = test transform only (default 10)")
    p.add_argument("--variant", default="text", choices=["text", "image", "both"],
                   help="TaskRes-T (text), TaskRes-I (image) or both (default text)")
    p.add_argument("--learn-alpha", action="store_true", help="train alpha as a scalar parameter")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")

    p = sub.add_parser("eval", help="re-evaluate a run (on its own test split or another dataset)")
    p.add_argument("--run", required=True, help="run folder")
    _common(p, backbone=False)
    p.add_argument("--out", default=None, help="folder to write metrics.json into")

    p = sub.add_parser("predict", help="classify images with a run's tuned classifier")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("images", nargs="+", help="image files")
    _common(p, data=False, backbone=False)

    sub.add_parser("methods", help="list the methods")
    p = sub.add_parser("datasets", help="list the benchmarks and, for a root, which are ready")
    p.add_argument("--root", help="the folder holding CoOp's dataset folders")
    return parser


def _setup(args: argparse.Namespace):
    from taskres.pipeline import Setup

    cache_dir = None if args.no_cache else (args.cache_dir or _default_cache())
    return Setup(device=args.device or _default_device(), precision=getattr(args, "precision", "fp32"),
                 cache_dir=cache_dir, batch_size=args.encode_batch_size, workers=args.workers, quiet=args.quiet,
                 skip_bad_images=getattr(args, "skip_bad_images", False), weights_dir=args.weights_dir)


def _dataset(args: argparse.Namespace, required: bool = True):
    from taskres.pipeline import open_dataset

    if not required and args.data is None and args.dataset is None and args.split_file is None:
        return None
    return open_dataset(args.data, args.split_file, args.template, dataset=args.dataset, root=args.root)


def _datasets(root: str | None) -> int:
    from taskres.data.benchmarks import BENCHMARKS, benchmark_status

    if root is None:
        for name, spec in BENCHMARKS.items():
            print(f"{name:<16} {spec.dataset_dir}/  templates: {len(spec.templates)}")
        print("\npass --root ROOT to see which are installed there.")
        return 0
    rows = benchmark_status(root)
    for row in rows:
        print(f"{row['name']:<16} {row['status']:<11} {row['path']}")
        if row["status"] != "ready":
            print(f"{'':<16} {row['reason']}\n{'':<16} to install: {row['download']}")
    ready = sum(r["status"] == "ready" for r in rows)
    print(f"\n{ready} of {len(rows)} datasets ready under {root}")
    return 0


def _print_metrics(metrics: dict, keys: Sequence[str]) -> None:
    for k in keys:
        if k in metrics:
            v = metrics[k]
            print(f"{k:>22}: {v:.2f}" if isinstance(v, float) else f"{k:>22}: {v}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "methods":
        from taskres.methods import METHODS

        for name, spec in METHODS.items():
            print(f"{name:<16} {spec.summary}")
        return 0
    if args.command == "datasets":
        return _datasets(args.root)
    if args.command == "predict":
        from taskres.pipeline import predict

        results = predict(args.run, args.images, _setup(args), top_k=args.top_k)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for r in results:
                print(r["image"])
                for t in r["top"]:
                    print(f"  {t['prob']:7.2%}  {t['class']}")
        return 0
    if args.command == "eval":
        from taskres.pipeline import evaluate_run

        metrics = evaluate_run(args.run, _setup(args), dataset=_dataset(args, required=False), out=args.out)
        _print_metrics(metrics, ["dataset", "accuracy", "n_test", "mean_per_class_accuracy", "skipped_images"])
        return 0

    from taskres.backbones import load_backbone
    from taskres.pipeline import zeroshot

    setup = _setup(args)
    dataset = _dataset(args)
    if args.command == "train":  # validate the cheap things before loading a backbone
        config = _train_config(args)
    backbone = load_backbone(args.backbone, device=setup.device, precision=setup.precision,
                             weights_dir=setup.weights_dir)
    if args.command == "zeroshot":
        metrics = zeroshot(backbone, dataset, setup, out=args.out, overwrite=args.overwrite)
        _print_metrics(metrics, ["accuracy", "n_test", "skipped_images"])
    else:
        from taskres.pipeline import train

        _, metrics = train(backbone, dataset, config, setup, out=args.out, overwrite=args.overwrite)
        _print_metrics(metrics, ["zero_shot_accuracy", "accuracy", "n_test", "n_train", "skipped_images",
                                 "seconds_features", "seconds_train"])
    print(f"{'run':>22}: {args.out}")
    return 0


def _train_config(args: argparse.Namespace):
    from taskres.engine import OptimConfig
    from taskres.methods.taskres import TaskResConfig
    from taskres.pipeline import TrainConfig

    if args.shots is not None and args.shots < 1:
        raise TaskResError(f"--shots must be >= 1 (images per class); got {args.shots}.")
    epochs = args.epochs if args.epochs is not None else (100 if args.shots <= 4 else 200)
    return TrainConfig(
        shots=args.shots, seed=args.seed, method=args.method, views=args.views,
        method_config=TaskResConfig(alpha=args.alpha, variant=args.variant, learn_alpha=args.learn_alpha),
        optim=OptimConfig(lr=args.lr, epochs=epochs, batch_size=args.batch_size, weight_decay=args.weight_decay),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except TaskResError as err:
        print(f"taskres: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `taskres datasets | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("taskres: interrupted; finished cache chunks are kept and the next run resumes from them.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
