"""The ``taskres`` command: parses arguments, calls the library, prints. User errors exit 2 without a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from taskres.errors import TaskResError

CACHE_ENV = "TASKRES_CACHE"


def _default_cache() -> str:
    return os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "taskres" / "features")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _common(p: argparse.ArgumentParser, data: bool = True, backbone: bool = True) -> None:
    if data:
        p.add_argument(
            "--data",
            help="dataset image folder (split-file paths are relative to it), or an ImageFolder "
            "root with train/<class>/ and test/<class>/",
        )
        p.add_argument("--split-file", help="CoOp split JSON (split_zhou_<Name>.json); omit for an ImageFolder")
        p.add_argument("--dataset", help="a benchmark by its CoOp config name (see `taskres datasets`), with --root")
        p.add_argument("--root", help="the folder holding CoOp's dataset folders (with --dataset)")
        p.add_argument(
            "--template",
            action="append",
            default=None,
            help="prompt template with {} (repeatable); default 'a photo of a {}.'",
        )
        p.add_argument("--skip-bad-images", action="store_true", help="skip undecodable images (counted in metrics)")
    p.add_argument(
        "--max-image-pixels",
        type=_pixels_arg,
        default=None,
        metavar="N",
        help="refuse images with more pixels than this (default 64 million; decoding takes about 4 bytes a pixel)",
    )
    if backbone:
        p.add_argument(
            "--backbone",
            required=True,
            help="RN50, RN101, ViT-B/32, ViT-B/16, RN50x16, taskres-demo, an open_clip MODEL:PRETRAINED "
            "pair, hf-hub:ORG/NAME[@REVISION] (from the local Hugging Face cache), or a checkpoint "
            "path",
        )
        p.add_argument(
            "--precision",
            default="fp32",
            choices=["fp32", "fp16", "bf16"],
            help="backbone precision for encoding (default fp32, as the protocol)",
        )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--cache-dir", default=None, help=f"feature cache folder (default ${CACHE_ENV} or ~/.cache/taskres/features)"
    )
    p.add_argument("--no-cache", action="store_true", help="encode without reading or writing the feature cache")
    p.add_argument(
        "--weights-dir",
        default=None,
        help="folder with backbone weight files (default $TASKRES_WEIGHTS or ~/.cache/taskres/weights)",
    )
    p.add_argument("--encode-batch-size", type=int, default=32, help="images per encoder batch (default 32)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image-decoding worker processes (default: auto, none for a small job, 1 on the CPU, up to "
        "8 on a GPU; 0 = decode in the main process)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskres", description="Task Residual tuning of CLIP on cached features.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy of the text classifier")
    _common(p)
    p.add_argument(
        "--protocol",
        default="default",
        choices=["default", "official"],
        help="default: the TaskRes base at initialisation (mean embedding over the dataset's templates); "
        "official: CoOp's ZeroshotCLIP, the paper's zero-shot row (one template per benchmark, '_' "
        "replaced by a space, each prompt's feature normalised)",
    )
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")

    p = sub.add_parser("train", help="train a method (default TaskRes) on K shots per class")
    _common(p)
    p.add_argument(
        "--shots", type=int, default=None, help="K, training images per class (required unless --fewshot-file gives it)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the few-shot draw and of training (required unless --fewshot-file's name gives it: seed_<S>)",
    )
    p.add_argument(
        "--fewshot-file",
        default=None,
        metavar="FILE",
        help="train on exactly these few-shot images: Dassl's split_fewshot/shot_<K>-seed_<S>.pkl (read "
        "safely; paths matched by their path relative to the image folder) or a run's "
        "fewshot_split.json",
    )
    p.add_argument(
        "--protocol",
        default="default",
        choices=["default", "official", "no-val"],
        help="no-val: nothing selected or tuned on a validation split (CLAP's protocol; methods that "
        "search use their fixed values); official: the method as its public code runs it "
        "(taskres: --views online and the base from the fp16 text encoder; tip-adapter(-f): its "
        "cache views, text classifier and selection, on the test split where the public code "
        "selects there, labelled so)",
    )
    p.add_argument(
        "--method",
        default="taskres",
        help="method (default taskres; see `taskres methods`); each "
        "method's own options below name the methods they apply to",
    )
    p.add_argument(
        "--lr",
        type=_finite_float,
        default=None,
        help="learning rate (default: the method's preset; TaskRes 2e-3, use 2e-4 for ImageNet)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs (default: the method's preset; TaskRes 100 for K <= 4, 200 for K >= 8)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="training batch size (default: the method's preset; TaskRes 256)"
    )
    p.add_argument(
        "--weight-decay",
        type=_finite_float,
        default=None,
        help="weight decay (default: the method's preset; TaskRes 5e-4)",
    )
    p.add_argument(
        "--views",
        type=_views_arg,
        default=None,
        metavar="V|online",
        help="augmented views per training image to encode once; 0 = test transform only; online = a "
        "fresh augmentation of every image in every epoch, encoded as it trains (the official "
        "protocol) (default 50, chosen by docs/views-study.md; linear-probe: 0; tip-adapter(-f): 10)",
    )
    _method_options(p)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")

    p = sub.add_parser("import-official", help="turn a checkpoint of the official TaskRes trainer into a run folder")
    p.add_argument("checkpoint", help="Dassl's prompt_learner/model.pth.tar-<epoch> (read without running its pickle)")
    _common(p)
    p.add_argument(
        "--alpha",
        type=_finite_float,
        default=None,
        help="the residual scale it was trained with (not in the file; default 0.5, 1.0 for Flowers102)",
    )
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")

    p = sub.add_parser("eval", help="re-evaluate a run (on its own test split or another dataset)")
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="run folder (--run-dir is the same flag for torchrun, whose own parser reads --run as an "
        "abbreviation of its --run-path)",
    )
    _common(p, backbone=False)
    p.add_argument("--out", default=None, help="folder to write metrics.json into")

    p = sub.add_parser("predict", help="classify images with a run's tuned classifier")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("images", nargs="+", help="image files")
    _common(p, data=False, backbone=False)

    p = sub.add_parser(
        "export", help="a run's image encoder and tuned classifier as one ONNX or TorchScript file (docs/export.md)"
    )
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument(
        "--format",
        required=True,
        choices=["onnx", "torchscript"],
        help="onnx (needs pip install 'taskres[export]') or torchscript",
    )
    p.add_argument("--out", required=True, help="file to write (e.g. model.onnx, model.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--check-images",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="images for the parity check against predict (default: the first 8 test images of the run's dataset)",
    )
    p.add_argument(
        "--weights-dir",
        default=None,
        help="folder with backbone weight files (default $TASKRES_WEIGHTS or ~/.cache/taskres/weights)",
    )

    p = sub.add_parser("demo", help="the offline main job: a shipped mini CLIP on generated tasks")
    p.add_argument("--out", default="demo-out", help="output folder (default ./demo-out)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per shot count (default 3: seeds 1..N)")
    p.add_argument("--views", type=int, default=10, help="augmented views per training image (default 10)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")

    from taskres.app.sweep_cli import add_parsers

    add_parsers(sub, _common, _method_options, _views_arg)

    sub.add_parser("methods", help="list the methods")
    p = sub.add_parser("datasets", help="list the benchmarks and, for a root, which are ready")
    p.add_argument("--root", help="the folder holding CoOp's dataset folders")
    return parser


def _finite_float(value: str) -> float:
    """argparse type: a float that is a number (nan and inf are refused at parsing)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {value!r}")
    return number


def _pixels_arg(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels; got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a number of pixels >= 1; got {value!r}")
    return number


def _views_arg(value: str):
    if value == "online":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'online'; got {value!r}") from None


def _setup(args: argparse.Namespace):
    from taskres.config import Setup
    from taskres.data.images import DEFAULT_MAX_PIXELS

    if args.encode_batch_size < 1:  # Setup's batch_size; --batch-size is the training batch
        raise TaskResError(f"--encode-batch-size must be >= 1; got {args.encode_batch_size}.")
    cache_dir = None if args.no_cache else (args.cache_dir or _default_cache())
    return Setup(
        device=_device(args),
        precision=getattr(args, "precision", "fp32"),
        cache_dir=cache_dir,
        batch_size=args.encode_batch_size,
        workers=args.workers,
        quiet=args.quiet,
        skip_bad_images=getattr(args, "skip_bad_images", False),
        weights_dir=args.weights_dir,
        max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS,
    )


def _dataset(args: argparse.Namespace, required: bool = True):
    from taskres.data.sources import open_dataset

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


_EXPORT_FLAGS = {"format": "--format", "overwrite": "--overwrite", "check_images": "--check-images"}


def _export(args: argparse.Namespace) -> int:
    import re

    from taskres.export import export_run

    try:
        report = export_run(
            args.run,
            args.out,
            args.format,
            check_images=args.check_images,
            weights_dir=args.weights_dir,
            overwrite=args.overwrite,
        )
    except TaskResError as err:  # export's own parameters as flags (the others are mapped by main)
        text = re.sub(r"`(\w+)`", lambda m: _EXPORT_FLAGS.get(m.group(1), m.group(0)), str(err))
        if err.param in _EXPORT_FLAGS and text.startswith(f"{err.param} "):
            text = _EXPORT_FLAGS[err.param] + text[len(err.param) :]
        raise TaskResError(text, param=None if err.param in _EXPORT_FLAGS else err.param) from None
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


def _print_metrics(metrics: dict, keys: Sequence[str]) -> None:
    for k in keys:
        if k in metrics:
            v = metrics[k]
            print(f"{k:>22}: {v:.2f}" if isinstance(v, float) else f"{k:>22}: {v}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "methods":
        from taskres.methods import discover

        methods = sorted(discover().items(), key=lambda kv: (kv[0] != "taskres", kv[0]))  # TaskRes, then A-Z
        width = max(len(name) for name, _ in methods) + 1
        for name, spec in methods:
            print(f"{name:<{width}} {spec.summary}")
        return 0
    if args.command == "demo":
        from taskres.app.demo import DemoConfig, run_demo

        if args.seeds < 1:
            raise TaskResError(f"--seeds must be >= 1; got {args.seeds}.")
        run_demo(
            args.out,
            DemoConfig(seeds=tuple(range(1, args.seeds + 1)), views=args.views),
            device=_device(args),
            quiet=args.quiet,
        )
        return 0
    if args.command == "datasets":
        return _datasets(args.root)
    if args.command == "export":
        return _export(args)
    if args.command in ("sweep", "report"):
        from taskres.app.sweep_cli import run_command

        setup = _setup(args) if args.command == "sweep" else None
        return run_command(args, setup, {flag: _dest(flag) for flag in _option_table()})
    if args.command == "predict":
        from taskres.reuse import predict

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
        from taskres.reuse import evaluate_run

        metrics = evaluate_run(args.run, _setup(args), dataset=_dataset(args, required=False), out=args.out)
        _print_metrics(metrics, ["dataset", "accuracy", "n_test", "mean_per_class_accuracy", "skipped_images"])
        return 0

    from taskres.backbones import load_backbone
    from taskres.workflow import zeroshot

    setup = _setup(args)
    dataset = _dataset(args)
    if args.command == "train":  # validate the cheap things before loading a backbone
        _shots_and_seed(args, dataset)
        config = _train_config(args, dataset.name)
    backbone = load_backbone(
        args.backbone, device=setup.device, precision=setup.precision, weights_dir=setup.weights_dir
    )
    if args.command == "zeroshot":
        metrics = zeroshot(backbone, dataset, setup, out=args.out, overwrite=args.overwrite, protocol=args.protocol)
        _print_metrics(metrics, ["accuracy", "n_test", "skipped_images"])
    elif args.command == "import-official":
        from taskres.methods.taskres_official import import_official

        _, metrics = import_official(
            args.checkpoint, backbone, dataset, setup, alpha=args.alpha, out=args.out, overwrite=args.overwrite
        )
        _print_metrics(
            metrics,
            [
                "zero_shot_accuracy",
                "imported_base_accuracy",
                "accuracy",
                "n_test",
                "base_relative_difference",
                "skipped_images",
            ],
        )
    else:
        from taskres.workflow import train

        _, metrics = train(backbone, dataset, config, setup, out=args.out, overwrite=args.overwrite)
        if metrics.get("test_selected"):
            print(
                "taskres: warning: this number was selected on the test split, as the method's public code does "
                "(metrics.json: test_selected true); do not compare it with numbers selected without test.",
                file=sys.stderr,
            )
        _print_metrics(
            metrics,
            [
                "zero_shot_accuracy",
                "enhanced_base_accuracy",
                "accuracy",
                "n_test",
                "n_train",
                "skipped_images",
                "seconds_features",
                "seconds_train",
                "text_projection_file",
            ],
        )
    print(f"{'run':>22}: {args.out}")
    return 0


_OPTIM_OPTIONS = ("lr", "epochs", "batch_size", "weight_decay")


def _option_table() -> dict[str, dict]:
    """Every method option flag: its argparse settings, the config field it sets and the methods that take it."""
    import typing

    from taskres.methods import discover

    table: dict[str, dict] = {}
    for method in discover().values():
        hints = typing.get_type_hints(method.config_cls)
        for f in method.options():
            meta = dict(f.metadata)
            flag = meta.pop("flag")
            help = meta.pop("help")
            entry = table.setdefault(
                flag, {"field": f.name, "methods": [], "helps": [], "kwargs": {**_argparse_type(hints[f.name]), **meta}}
            )
            if entry["field"] != f.name:
                raise RuntimeError(
                    f"flag {flag} sets field {entry['field']!r} of one method and {f.name!r} of "
                    f"{method.name!r}; one flag must set one field name"
                )
            entry["methods"].append(method.name)
            if help not in entry["helps"]:
                entry["helps"].append(help)
    return table


def _argparse_type(annotation) -> dict:
    """argparse settings for a config field's type: bool -> a switch; Literal -> choices; float/int/str."""
    import typing

    if annotation is bool:
        return {"action": "store_true"}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    # Optional[X]: X
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    if inner:
        return _argparse_type(inner[0])
    return {"type": _finite_float} if annotation is float else {"type": annotation}


def _method_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("method options (each applies to the methods it names)")
    for flag, entry in _option_table().items():
        kwargs = dict(entry["kwargs"])
        if kwargs.get("action") != "store_true" and "choices" not in kwargs:
            kwargs.setdefault("metavar", entry["field"].upper())
        default = False if kwargs.get("action") == "store_true" else None
        group.add_argument(
            flag,
            dest=_dest(flag),
            default=default,
            help=f"{', '.join(entry['methods'])}: {'; '.join(entry['helps'])}",
            **kwargs,
        )


def _dest(flag: str) -> str:
    return "option_" + flag.lstrip("-").replace("-", "_")


def _given(args: argparse.Namespace, name: str) -> bool:
    value = getattr(args, name)
    return value is not None and value is not False


def _shots_and_seed(args: argparse.Namespace, dataset) -> None:
    """--shots and --seed, or what --fewshot-file says of them (given ones are checked against it)."""
    if args.fewshot_file is not None:
        from taskres.data.fewshot_file import load_fewshot_file

        _, info = load_fewshot_file(args.fewshot_file, dataset)
        if args.shots is not None and args.shots != info["shots"]:
            raise TaskResError(
                f"--shots {args.shots} disagrees with --fewshot-file, which holds up to "
                f"{info['shots']} images per class; drop --shots or pass --shots {info['shots']}."
            )
        args.shots = info["shots"]
        if args.seed is None:
            args.seed = info["seed"]
    if args.shots is None:
        raise TaskResError("--shots is required (or --fewshot-file, which gives it).")
    if args.seed is None:
        raise TaskResError("--seed is required (the few-shot file's name gives none: pass --seed S).")


def _train_config(args: argparse.Namespace, dataset_name: str = ""):
    """The method's preset for the dataset, with the options given on the command line."""
    from taskres.config import TrainConfig
    from taskres.methods import get_method

    spec = get_method(args.method)
    values = {}
    for flag, entry in _option_table().items():
        if not _given(args, _dest(flag)):
            continue
        if spec.name not in entry["methods"]:
            raise TaskResError(f"{flag} applies to --method {' or '.join(entry['methods'])}; got --method {spec.name}.")
        values[entry["field"]] = getattr(args, _dest(flag))
    if not spec.trained:
        given = [f"--{n.replace('_', '-')}" for n in _OPTIM_OPTIONS if _given(args, n)]
        if given:
            raise TaskResError(f"{', '.join(given)}: method {spec.name!r} is training-free; drop the option(s).")
    # The same resolution as `taskres sweep`'s cells: the preset, then the options given.
    return TrainConfig.resolve(
        spec.name,
        args.shots,
        args.seed,
        dataset_name,
        options=values,
        optim={k: getattr(args, k) for k in _OPTIM_OPTIONS if _given(args, k)},
        views=args.views,
        protocol=args.protocol,
        fewshot_file=args.fewshot_file,
    )


def _flag_names(method: str | None) -> dict[str, str]:
    """Library parameter names -> the flags that set them (for error messages); ``method``'s options win."""
    flags = {
        "views": "--views",
        "shots": "--shots",
        "seed": "--seed",
        "lr": "--lr",
        "epochs": "--epochs",
        "batch_size": "--batch-size",
        "weight_decay": "--weight-decay",
        "device": "--device",
        "precision": "--precision",
        "top_k": "--top-k",
        "workers": "--workers",
        "out": "--out",
        "run": "--run",
        "method": "--method",
        "data": "--data",
        "dataset": "--dataset",
        "root": "--root",
        "split_file": "--split-file",
        "skip_bad_images": "--skip-bad-images",
        "fewshot_file": "--fewshot-file",
        "checkpoint": "CHECKPOINT",
        "protocol": "--protocol",
        "cache_dir": "--cache-dir",
        "templates": "--template",
        "max_image_pixels": "--max-image-pixels",
        "backbone": "--backbone",
        "methods": "--methods",
        "seeds": "--seeds",
        "shard": "--shard",
        "preset": "--preset",
        "config": "--config",
        "exp": "EXP",
        "eval_on": "--eval-on",
    }
    table = _option_table()
    flags.update({entry["field"]: flag for flag, entry in table.items() if entry["field"] not in flags})
    flags.update({entry["field"]: flag for flag, entry in table.items() if method in entry["methods"]})
    return flags


def _message(err: TaskResError, method: str | None = None) -> str:
    """The library's message with parameters named as the flags the user typed: the leading parameter of
    ``alpha must ...`` and every `name` in backquotes (``set `search` none`` -> ``set --search none``)."""
    import re

    flags = _flag_names(method)
    text = str(err)
    param = getattr(err, "param", None)
    if param in flags and text.startswith(param + " "):
        text = flags[param] + text[len(param) :]
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), text)


# Commands whose ranks share the encoding under torchrun; the others run on rank 0 alone.
COLLECTIVE = ("zeroshot", "train", "eval", "sweep", "demo")


def _join_cluster(args: argparse.Namespace, argv: Sequence[str]) -> bool:
    """Under torchrun: join the job for a collective command (False: this rank has nothing to do). The other ranks
    stay silent on stdout; rank 0 reports."""
    from taskres import distributed

    env = distributed.from_env()
    if not env.active:
        return True
    if args.command not in COLLECTIVE:
        return env.is_main
    distributed.init_from_env(getattr(args, "device", None) or _default_device(), list(argv))
    if not env.is_main:
        sys.stdout = open(os.devnull, "w")
    return True


def _device(args: argparse.Namespace) -> str:
    from taskres import distributed

    return distributed.rank_device(args.device or _default_device(), distributed.current())


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if not _join_cluster(args, argv):
            return 0
        return _run(args)
    except TaskResError as err:
        print(f"taskres: error: {_message(err, getattr(args, 'method', None))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `taskres datasets | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(
            "taskres: interrupted; the run folder is left as it was, finished cache chunks are kept and the next "
            "run resumes from them.",
            file=sys.stderr,
        )
        return 130
    finally:
        if "taskres.distributed" in sys.modules:
            sys.modules["taskres.distributed"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
