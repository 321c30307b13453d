"""The command line's options, each defined once: the flags the commands share (``FLAGS``), the optimiser and method
options read off their config dataclasses, and one parser per annotation (``value_parser``) that argparse, ``sweep
--grid NAME=V1,V2`` and a ``sweep --config`` TOML file use alike (``taskres.app.sweep_cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskres.errors import TaskResError

Parser = Callable[[str], Any]
PROTOCOLS = ("default", "official", "no-val")  # TrainConfig.protocol's values
PRECISIONS = ("fp32", "fp16", "bf16")
ENGINES = ("eager", "channels-last", "onnxruntime")  # taskres.backbones.engines.ENGINES (not imported: torch)
OPTIM_OPTIONS = ("lr", "epochs", "batch_size", "weight_decay")  # OptimConfig fields the command line sets


def finite_float(text: str) -> float:
    """A float that is a number (nan and inf are refused)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return number


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def boolean(text: str) -> bool:
    """``true`` or ``false`` (any case): a switch's value where it cannot be a switch (--grid, TOML)."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")
    return text.lower() == "true"


def choice(choices: Sequence[str]) -> Parser:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(repr(c) for c in choices)})"
            )
        return text

    return parse


@functools.cache
def value_parser(annotation: Any) -> Parser:
    """The parser of a config field's values from text: bool (true/false), a Literal's choices, Optional[X] as X,
    int, float (finite) or str. Errors are argparse.ArgumentTypeError, as argparse reports them."""
    if annotation is bool:
        return boolean
    if typing.get_origin(annotation) is typing.Literal:
        return choice(typing.get_args(annotation))
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    if inner:  # Optional[X], X | None
        return value_parser(inner[0])
    parsers: dict[Any, Parser] = {int: integer, float: finite_float, str: str}
    if annotation not in parsers:
        raise TypeError(f"no command-line parser for {annotation!r}: use bool, a Literal, int, float, str or Optional")
    return parsers[annotation]


def argparse_kwargs(annotation: Any) -> dict:
    """A config field's flag: a switch for a bool, else the field's value parser (and choices, for the help)."""
    if annotation is bool:
        return {"action": "store_true"}
    kwargs: dict[str, Any] = {"type": value_parser(annotation)}
    literals = [a for a in (annotation, *typing.get_args(annotation)) if typing.get_origin(a) is typing.Literal]
    if literals:
        kwargs["choices"] = list(typing.get_args(literals[0]))
    return kwargs


@dataclass(frozen=True)
class CommaList:
    """The parser of a comma-separated list whose items ``element`` parses (the parser of the single flag)."""

    element: Parser

    def __call__(self, text: str) -> tuple:
        return self.items(text.split(","))

    def items(self, texts: Iterable[str]) -> tuple:
        """The items parsed (blank ones left out); none at all is refused rather than read as the default."""
        values = tuple(self.element(t.strip()) for t in texts if t.strip())
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values


def views_value(text: str) -> int | str:
    if text == "online":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'online'; got {text!r}") from None


def pixels(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels; got {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a number of pixels >= 1; got {text!r}")
    return number


CACHE_ENV = "TASKRES_CACHE"
_BACKBONES = (
    "RN50, RN101, ViT-B/32, ViT-B/16, RN50x16, taskres-demo, an open_clip MODEL:PRETRAINED pair, "
    "hf-hub:ORG/NAME[@REVISION] (from the local Hugging Face cache), or a checkpoint path"
)
# Every shared flag, once. A command takes a list flag's many form with ``add(..., many=True)``: the same element
# parser, comma-separated.
FLAGS: dict[str, dict[str, Any]] = {
    "--data": dict(
        help="dataset image folder (split-file paths are relative to it), or an ImageFolder root with "
        "train/<class>/ and test/<class>/"
    ),
    "--split-file": dict(help="CoOp split JSON (split_zhou_<Name>.json); omit for an ImageFolder"),
    "--dataset": dict(type=str, help="a benchmark by its CoOp config name (see `taskres datasets`), with --root"),
    "--root": dict(help="the folder holding CoOp's dataset folders (with --dataset)"),
    "--template": dict(action="append", help="prompt template with {} (repeatable); default 'a photo of a {}.'"),
    "--skip-bad-images": dict(action="store_true", help="skip undecodable images (counted in metrics)"),
    "--max-image-pixels": dict(
        type=pixels,
        metavar="N",
        help="refuse images with more pixels than this (default 64 million; decoding takes about 4 bytes a pixel)",
    ),
    "--backbone": dict(type=str, required=True, help=_BACKBONES),
    "--precision": dict(
        type=choice(PRECISIONS),
        default="fp32",
        choices=list(PRECISIONS),
        help="backbone precision for encoding (default fp32, as the protocol)",
    ),
    "--engine": dict(
        type=choice(ENGINES),
        choices=list(ENGINES),
        help="image encoder: eager (default; eval, predict: the run's), channels-last (ResNets on the CPU; a ViT gains "
        "nothing) or onnxruntime (CPU, fp32; pip install 'taskres[export]'); within 1e-4 of eager, cached apart",
    ),
    "--device": dict(help="torch device (default: cuda if available, else cpu)"),
    "--cache-dir": dict(help=f"feature cache folder (default ${CACHE_ENV} or ~/.cache/taskres/features)"),
    "--no-cache": dict(action="store_true", help="encode without reading or writing the feature cache"),
    "--weights-dir": dict(
        help="folder with backbone weight files (default $TASKRES_WEIGHTS or ~/.cache/taskres/weights)"
    ),
    "--encode-batch-size": dict(type=integer, default=32, help="images per encoder batch (default 32)"),
    "--workers": dict(
        type=integer,
        help="image-decoding worker processes (default: auto, none for a small job, 1 on the CPU, up to 8 on a GPU; "
        "0 = decode in the main process)",
    ),
    "--quiet": dict(action="store_true", help="no progress bars"),
    "--shots": dict(type=integer, help="K, training images per class (required unless --fewshot-file gives it)"),
    "--seed": dict(
        type=integer,
        help="seed of the few-shot draw and of training (required unless --fewshot-file's name gives it: seed_<S>)",
    ),
    "--fewshot-file": dict(
        metavar="FILE",
        help="train on exactly these few-shot images: Dassl's split_fewshot/shot_<K>-seed_<S>.pkl (read safely; "
        "paths matched by their path relative to the image folder) or a run's fewshot_split.json",
    ),
    "--protocol": dict(
        type=choice(PROTOCOLS),
        default="default",
        choices=list(PROTOCOLS),
        help="no-val: nothing selected or tuned on a validation split (CLAP's protocol; methods that search use "
        "their fixed values); official: the method as its public code runs it (taskres: --views online and the "
        "base from the fp16 text encoder; tip-adapter(-f): its cache views, text classifier and selection, on the "
        "test split where the public code selects there, labelled so)",
    ),
    "--method": dict(
        type=str,
        default="taskres",
        help="method (default taskres; see `taskres methods`); each method's own options below name the methods "
        "they apply to",
    ),
    "--views": dict(
        type=views_value,
        metavar="V|online",
        help="augmented views per training image to encode once; 0 = test transform only; online = a fresh "
        "augmentation of every image in every epoch, encoded as it trains (the official protocol) (default: the "
        "method's: 50, chosen by docs/views-study.md; linear-probe: 0; tip-adapter(-f): 10)",
    ),
    "--out": dict(required=True, help="run folder to write"),
    "--overwrite": dict(action="store_true", help="replace a finished run in --out"),
}
# The many form of a flag: comma-separated, each item read by the single flag's parser.
_MANY = {
    "--dataset": "--dataset",
    "--backbone": "--backbone",
    "--method": "--methods",
    "--shots": "--shots",
    "--seed": "--seeds",
}
DATA = ("--data", "--split-file", "--dataset", "--root", "--template", "--skip-bad-images")
ENCODING = (
    "--engine",
    "--device",
    "--cache-dir",
    "--no-cache",
    "--weights-dir",
    "--encode-batch-size",
    "--workers",
    "--quiet",
)


def add(parser: argparse.ArgumentParser, *flags: str, many: bool = False, **changes: Any) -> None:
    """Add the shared ``flags`` to ``parser``; ``many``: their comma-separated form (``--seed`` -> ``--seeds``),
    optional and parsed item by item as the single flag is; ``changes``: argparse settings that differ here."""
    for flag in flags:
        kwargs = dict(FLAGS[flag])
        if many:
            kwargs.update(type=CommaList(kwargs.get("type", str)), required=False, default=None)
        parser.add_argument(_MANY[flag] if many else flag, **{**kwargs, **changes})


def add_common(parser: argparse.ArgumentParser, data: bool = True, backbone: bool = True) -> None:
    """The dataset, backbone and encoding flags of the commands that encode images."""
    if data:
        add(parser, *DATA)
    add(parser, "--max-image-pixels")
    if backbone:
        add(parser, "--backbone", "--precision")
    add(parser, *ENCODING)


@dataclass(frozen=True)
class Option:
    """A config field on the command line: a method option (``--alpha``, from the methods' config dataclasses) or
    an optimiser option (``--lr``, from OptimConfig)."""

    flag: str
    field: str
    annotation: Any
    help: str
    methods: tuple[str, ...] = ()  # the methods that take it (empty: every trained method)
    extra: dict = dataclasses.field(default_factory=dict)  # argparse settings from the field's metadata (metavar)

    @property
    def dest(self) -> str:
        return ("option_" if self.methods else "") + self.flag.lstrip("-").replace("-", "_")

    @property
    def name(self) -> str:
        """Its name in --grid and a TOML file: the flag without dashes (``learn_alpha``)."""
        return self.flag.lstrip("-").replace("-", "_")

    def parse(self, text: str) -> Any:
        return value_parser(self.annotation)(text)

    def add_to(self, parser: argparse._ActionsContainer) -> None:
        kwargs = {**argparse_kwargs(self.annotation), **self.extra}
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", self.field.upper())
        default = False if kwargs.get("action") == "store_true" else None
        parser.add_argument(self.flag, dest=self.dest, default=default, help=self.help, **kwargs)


def method_options() -> dict[str, Option]:
    """Every method option by flag: the field it sets, its type (from the first method that declares it) and the
    methods that take it."""
    from taskres.methods import discover
    from taskres.methods.registry import option_flags

    methods = discover()
    table = {}
    for flag, (name, takers) in option_flags().items():
        fields = [next(f for f in methods[m].options() if f.name == name) for m in takers]
        helps = list(dict.fromkeys(f.metadata["help"] for f in fields))
        extra = {k: v for k, v in fields[0].metadata.items() if k not in ("flag", "help")}
        annotation = typing.get_type_hints(methods[takers[0]].config_cls)[name]
        table[flag] = Option(flag, name, annotation, f"{', '.join(takers)}: {'; '.join(helps)}", takers, extra)
    return table


_OPTIM_HELP = {
    "lr": "learning rate (default: the method's preset; TaskRes 2e-3, use 2e-4 for ImageNet)",
    "epochs": "epochs (default: the method's preset; TaskRes 100 for K <= 4, 200 for K >= 8)",
    "batch_size": "training batch size (default: the method's preset; TaskRes 256)",
    "weight_decay": "weight decay (default: the method's preset; TaskRes 5e-4)",
}


def optim_options() -> dict[str, Option]:
    """The optimiser options by flag, typed as OptimConfig's fields."""
    from taskres.engine import OptimConfig

    hints = typing.get_type_hints(OptimConfig)
    return {
        f"--{n.replace('_', '-')}": Option(f"--{n.replace('_', '-')}", n, hints[n], _OPTIM_HELP[n])
        for n in OPTIM_OPTIONS
    }


def add_optim_options(parser: argparse.ArgumentParser) -> None:
    for option in optim_options().values():
        option.add_to(parser)


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """Every method option, in a group of its own."""
    group = parser.add_argument_group("method options (each applies to the methods it names)")
    for option in method_options().values():
        option.add_to(group)


def given(args: argparse.Namespace, dest: str) -> bool:
    """Whether a flag was given (a switch: set)."""
    value = getattr(args, dest, None)
    return value is not None and value is not False


# ---- what the shared flags build ------------------------------------------------------------------------------


def default_cache() -> str:
    return os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "taskres" / "features")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_from_args(args: argparse.Namespace):
    """The Setup of the encoding flags (``add_common``)."""
    from taskres.config import Setup
    from taskres.data.images import DEFAULT_MAX_PIXELS

    cache_dir = None if args.no_cache else (args.cache_dir or default_cache())
    try:
        return Setup(
            device=device_from_args(args),
            precision=getattr(args, "precision", "fp32"),
            engine=getattr(args, "engine", None),
            cache_dir=cache_dir,
            batch_size=args.encode_batch_size,
            workers=args.workers,
            quiet=args.quiet,
            skip_bad_images=getattr(args, "skip_bad_images", False),
            weights_dir=args.weights_dir,
            max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS,
        )
    except TaskResError as err:
        if err.param == "batch_size":  # the encoder's batch: --batch-size is the training batch
            raise renamed(err, "encode_batch_size") from None
        raise


def dataset_from_args(args: argparse.Namespace, required: bool = True):
    from taskres.data.sources import open_dataset

    if not required and args.data is None and args.dataset is None and args.split_file is None:
        return None
    return open_dataset(args.data, args.split_file, args.template, dataset=args.dataset, root=args.root)


def backbone_from_args(args: argparse.Namespace, setup):
    from taskres.backbones import load_backbone

    return load_backbone(args.backbone, setup.device, setup.precision, setup.weights_dir, setup.engine or "eager")


def device_from_args(args: argparse.Namespace) -> str:
    from taskres import distributed

    return distributed.rank_device(args.device or default_device(), distributed.current())


def renamed(err: TaskResError, dest: str) -> TaskResError:
    """``err`` with its parameter named ``dest``, for a library parameter whose flag is another's name (Setup's
    ``batch_size`` is --encode-batch-size; --batch-size is the training batch)."""
    text, param = str(err), err.param or ""
    if text.startswith(param + " "):
        text = dest + text[len(param) :]
    return type(err)(text.replace(f"`{param}`", f"`{dest}`"), param=dest)
