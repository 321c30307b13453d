"""The commands on a finished run folder: ``eval``, ``predict`` and ``export``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from taskres.app.options import add, add_common, choice, dataset_from_args, integer, setup_from_args


def add_parsers(sub) -> None:
    _eval_parser(sub)
    _predict_parser(sub)
    _export_parser(sub)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="re-evaluate a run (on its own test split or another dataset)")
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="run folder (--run-dir is the same flag for torchrun, whose own parser reads --run as an "
        "abbreviation of its --run-path)",
    )
    add_common(p, backbone=False)
    p.add_argument("--out", default=None, help="folder to write metrics.json into")
    p.set_defaults(handler=_eval)


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a run's tuned classifier")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--top-k", type=integer, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("images", nargs="+", help="image files")
    add_common(p, data=False, backbone=False)
    p.set_defaults(handler=_predict)


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="a run's image encoder and tuned classifier as one ONNX or TorchScript file (docs/export.md)"
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument(
        "--format",
        required=True,
        type=choice(("onnx", "torchscript")),
        choices=["onnx", "torchscript"],
        help="onnx (needs pip install 'taskres[export]') or torchscript",
    )
    p.add_argument("--out", required=True, help="file to write (e.g. model.onnx, model.pt)")
    add(p, "--overwrite", help="replace an existing --out file")
    p.add_argument(
        "--check-images",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="images for the parity check against predict (default: the first 8 test images of the run's dataset)",
    )
    add(p, "--weights-dir")
    p.set_defaults(handler=_export)


def _eval(args: argparse.Namespace) -> int:
    from taskres.reuse import evaluate_run

    metrics = evaluate_run(
        args.run, setup_from_args(args), dataset=dataset_from_args(args, required=False), out=args.out
    )
    print_metrics(metrics, ["dataset", "accuracy", "n_test", "mean_per_class_accuracy", "skipped_images"])
    return 0


def _predict(args: argparse.Namespace) -> int:
    """Every image gets its entry; one that cannot be read gets its reason (JSON: ``error``) and the exit status
    is 1, as a sweep with a failed cell."""
    from taskres.reuse import predict

    results = predict(args.run, args.images, setup_from_args(args), top_k=args.top_k, bad_images="report")
    for r in results:
        if "error" in r:  # parameters as the flags that set them, as in every other message
            r["error"] = re.sub(r"`(\w+)`", lambda m: "--" + m.group(1).replace("_", "-"), r["error"])
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"])
            if "error" in r:
                print(f"  error: {r['error']}")
            for t in r["top"]:
                print(f"  {t['prob']:7.2%}  {t['class']}")
    failed = sum("error" in r for r in results)
    if failed:
        print(
            f"taskres: {failed} of {len(results)} images could not be read (each entry says why); the others are "
            "predicted.",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _export(args: argparse.Namespace) -> int:
    from taskres.export import export_run

    report = export_run(
        args.run,
        args.out,
        args.format,
        check_images=args.check_images,
        weights_dir=args.weights_dir,
        overwrite=args.overwrite,
    )
    meta, parity = report["metadata"], report["parity"]
    print(f"{'exported':>22}: {report['out']} ({report['format']}, method {report['method']})")
    print(
        f"{'input':>22}: image float32 (N, 3, {meta['image_size']}, {meta['image_size']}), mean {meta['mean']}, "
        f"std {meta['std']}"
    )
    print(f"{'outputs':>22}: logits, probs (N, {len(meta['class_names'])})")
    print(
        f"{'parity with predict':>22}: {parity['images']} images, max |diff| logits {parity['max_abs_logits']:.2g}, "
        f"probs {parity['max_abs_probs']:.2g}"
    )
    return 0


def print_metrics(metrics: dict, keys: Sequence[str]) -> None:
    for k in keys:
        if k in metrics:
            v = metrics[k]
            print(f"{k:>22}: {v:.2f}" if isinstance(v, float) else f"{k:>22}: {v}")
