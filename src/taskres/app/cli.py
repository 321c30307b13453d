"""The ``taskres`` command: parses arguments, calls the library, prints. User errors exit 2 without a traceback.

Each command is a parser (its flags from ``taskres.app.options``, where every shared flag is defined once) and a
handler that it sets as its default."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Sequence

from taskres.app import run_cli, sweep_cli
from taskres.app.messages import describe, message_names
from taskres.app.options import (
    PROTOCOLS,
    add,
    add_common,
    add_method_options,
    add_optim_options,
    backbone_from_args,
    choice,
    dataset_from_args,
    default_device,
    device_from_args,
    finite_float,
    given,
    integer,
    method_options,
    optim_options,
    setup_from_args,
)
from taskres.app.run_cli import print_metrics
from taskres.errors import TaskResError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskres", description="Task Residual tuning of CLIP on cached features.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = (
        _zeroshot_parser,
        _train_parser,
        _import_parser,
        run_cli.add_parsers,
        _demo_parser,
        sweep_cli.add_parsers,
    )
    for add_commands in commands:
        add_commands(sub)
    sub.add_parser("methods", help="list the methods").set_defaults(handler=_methods)
    p = sub.add_parser("datasets", help="list the benchmarks and, for a root, which are ready")
    p.add_argument("--root", help="the folder holding CoOp's dataset folders")
    p.set_defaults(handler=_datasets)
    return parser


def _zeroshot_parser(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot accuracy of the text classifier")
    add_common(p)
    zeroshot_protocols = PROTOCOLS[:2]
    add(
        p,
        "--protocol",
        type=choice(zeroshot_protocols),
        choices=list(zeroshot_protocols),
        help="default: the TaskRes base at initialisation (mean embedding over the dataset's templates); "
        "official: CoOp's ZeroshotCLIP, the paper's zero-shot row (one template per benchmark, '_' "
        "replaced by a space, each prompt's feature normalised)",
    )
    add(p, "--out", "--overwrite")
    p.set_defaults(handler=_zeroshot)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a method (default TaskRes) on K shots per class")
    add_common(p)
    add(p, "--shots", "--seed", "--fewshot-file", "--protocol", "--method")
    add_optim_options(p)
    add(p, "--views")
    add_method_options(p)
    add(p, "--out", "--overwrite")
    p.set_defaults(handler=_train)


def _import_parser(sub) -> None:
    p = sub.add_parser("import-official", help="turn a checkpoint of the official TaskRes trainer into a run folder")
    p.add_argument("checkpoint", help="Dassl's prompt_learner/model.pth.tar-<epoch> (read without running its pickle)")
    add_common(p)
    p.add_argument(
        "--alpha",
        type=finite_float,
        help="the residual scale it was trained with (not in the file; default 0.5, 1.0 for Flowers102)",
    )
    add(p, "--out", "--overwrite")
    p.set_defaults(handler=_import_official)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the offline main job: a shipped mini CLIP on generated tasks")
    p.add_argument("--out", default="demo-out", help="output folder (default ./demo-out)")
    p.add_argument("--seeds", type=integer, default=3, help="seeds per shot count (default 3: seeds 1..N)")
    p.add_argument("--views", type=integer, default=10, help="augmented views per training image (default 10)")
    add(p, "--device")
    add(p, "--quiet", help="print only the final table")
    p.set_defaults(handler=_demo)


def _zeroshot(args: argparse.Namespace) -> int:
    from taskres.workflow import zeroshot

    setup = setup_from_args(args)
    dataset = dataset_from_args(args)
    metrics = zeroshot(
        backbone_from_args(args, setup), dataset, setup, out=args.out, overwrite=args.overwrite, protocol=args.protocol
    )
    print_metrics(metrics, ["accuracy", "n_test", "skipped_images"])
    print(f"{'run':>22}: {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from taskres.workflow import train

    setup = setup_from_args(args)
    dataset = dataset_from_args(args)
    _shots_and_seed(args, dataset)  # the cheap checks before loading a backbone
    config = _train_config(args, dataset.name)
    _, metrics = train(backbone_from_args(args, setup), dataset, config, setup, out=args.out, overwrite=args.overwrite)
    if metrics.get("test_selected"):
        print(
            "taskres: warning: this number was selected on the test split, as the method's public code does "
            "(metrics.json: test_selected true); do not compare it with numbers selected without test.",
            file=sys.stderr,
        )
    keys = ["zero_shot_accuracy", "enhanced_base_accuracy", "accuracy", "n_test", "n_train", "skipped_images"]
    print_metrics(metrics, [*keys, "seconds_features", "seconds_train", "text_projection_file"])
    print(f"{'run':>22}: {args.out}")
    return 0


def _import_official(args: argparse.Namespace) -> int:
    from taskres.methods.taskres_official import import_official

    setup = setup_from_args(args)
    dataset = dataset_from_args(args)
    _, metrics = import_official(
        args.checkpoint,
        backbone_from_args(args, setup),
        dataset,
        setup,
        alpha=args.alpha,
        out=args.out,
        overwrite=args.overwrite,
    )
    keys = ["zero_shot_accuracy", "imported_base_accuracy", "accuracy", "n_test", "base_relative_difference"]
    print_metrics(metrics, [*keys, "skipped_images"])
    print(f"{'run':>22}: {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from taskres.app.demo import DemoConfig, run_demo

    if args.seeds < 1:
        raise TaskResError(f"--seeds must be >= 1; got {args.seeds}.")
    run_demo(
        args.out,
        DemoConfig(seeds=tuple(range(1, args.seeds + 1)), views=args.views),
        device=device_from_args(args),
        quiet=args.quiet,
    )
    return 0


def _methods(args: argparse.Namespace) -> int:
    from taskres.methods import discover

    methods = sorted(discover().items(), key=lambda kv: (kv[0] != "taskres", kv[0]))  # TaskRes, then A-Z
    width = max(len(name) for name, _ in methods) + 1
    for name, spec in methods:
        print(f"{name:<{width}} {spec.summary}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from taskres.data.benchmarks import BENCHMARKS, benchmark_status

    if args.root is None:
        for name, spec in BENCHMARKS.items():
            print(f"{name:<16} {spec.dataset_dir}/  templates: {len(spec.templates)}")
        print("\npass --root ROOT to see which are installed there.")
        return 0
    rows = benchmark_status(args.root)
    for row in rows:
        print(f"{row['name']:<16} {row['status']:<11} {row['path']}")
        if row["status"] != "ready":
            print(f"{'':<16} {row['reason']}\n{'':<16} to install: {row['download']}")
    ready = sum(r["status"] == "ready" for r in rows)
    print(f"\n{ready} of {len(rows)} datasets ready under {args.root}")
    return 0


def _shots_and_seed(args: argparse.Namespace, dataset) -> None:
    """--shots and --seed, or what --fewshot-file says of them (the library checks given ones against it)."""
    if args.fewshot_file is not None:
        from taskres.data.fewshot_file import load_fewshot_file

        _, info = load_fewshot_file(args.fewshot_file, dataset)
        args.shots = info["shots"] if args.shots is None else args.shots
        args.seed = info["seed"] if args.seed is None else args.seed
    if args.shots is None:
        raise TaskResError("--shots is required (or --fewshot-file, which gives it).")
    if args.seed is None:
        raise TaskResError("--seed is required (the few-shot file's name gives none: pass --seed S).")


def _train_config(args: argparse.Namespace, dataset_name: str = ""):
    """The method's preset for the dataset, with the options given on the command line (as `taskres sweep`'s
    cells: TrainConfig.resolve)."""
    from taskres.config import TrainConfig
    from taskres.methods import get_method

    spec = get_method(args.method)
    values = {}
    for option in method_options().values():
        if given(args, option.dest):
            if spec.name not in option.methods:
                raise TaskResError(
                    f"{option.flag} applies to --method {' or '.join(option.methods)}; got --method {spec.name}."
                )
            values[option.field] = getattr(args, option.dest)
    return TrainConfig.resolve(
        spec.name,
        args.shots,
        args.seed,
        dataset_name,
        options=values,
        optim={o.field: getattr(args, o.dest) for o in optim_options().values() if given(args, o.dest)},
        views=args.views,
        protocol=args.protocol,
        fewshot_file=args.fewshot_file,
    )


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
    distributed.init_from_env(getattr(args, "device", None) or default_device(), list(argv))
    if not env.is_main:
        sys.stdout = open(os.devnull, "w")
    return True


def _print_names_as_bytes() -> None:
    """Let stdout print a path whose name is not UTF-8 as its bytes (as ls does), whatever the locale: Python reads
    such bytes as surrogate escapes, which a strict stdout (PYTHONIOENCODING=utf-8, a UTF-8 locale) refuses."""
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="surrogateescape")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _print_names_as_bytes()
    try:
        parser = build_parser()  # imports torch and the methods: seconds, during which Ctrl-C is likely
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("taskres: interrupted.", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if not _join_cluster(args, argv):
            return 0
        return args.handler(args)
    except TaskResError as err:
        method = getattr(err, "method", None) or getattr(args, "method", None)
        print(f"taskres: error: {describe(err, message_names(parser, args.command, method))}", file=sys.stderr)
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
