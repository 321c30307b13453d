"""The method registry: each method module registers itself by name (as timm's ``@register_model`` and PEFT's
``register_peft_method``); the CLI, the workflow and ``taskres methods`` read it and nothing else."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from taskres.backbones import Backbone
from taskres.engine import OptimConfig
from taskres.errors import TaskResValueError, suggest
from taskres.methods.base import FitContext, Fitted, Head, config_options


@dataclass(frozen=True)
class OfficialVariant:
    """What ``protocol="official"`` changes for a method: how its public code gets its training views, its base
    classifier and its selection (docs/protocol.md).

    ``views``: "online" (a fresh augmentation per epoch) or a number of cached views at ``view_scale``;
    ``base``: "fp16_text" (the mean text embedding, computed in fp16 as the TaskRes trainer does, which also
    encodes the images as that trainer does), "normalized_templates" (per-template normalised, "_" replaced) or
    "zeroshot_clip" (that, with text and images encoded in fp16 as CoOp's ``ZeroshotCLIP`` does); ``templates``:
    "dataset" (the dataset's) or "coop_zeroshot" (CoOp's one template per benchmark, as its ``ZeroshotCLIP``);
    ``selection``: "public" gives the fit the splits the public code selects on
    (the full val split, and the test split where the public code uses it), and the fit reports ``test_selected``.
    """

    views: int | Literal["online"] = "online"
    view_scale: tuple[float, float] = (0.08, 1.0)
    base: Literal["fp16_text", "normalized_templates", "zeroshot_clip"] = "fp16_text"
    templates: Literal["dataset", "coop_zeroshot"] = "dataset"
    selection: Literal["none", "public"] = "none"


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``config_preset(dataset)`` gives the method's config for a benchmark name ("" for others; default:
    ``config_cls()``); ``optim_preset(shots, dataset)`` its published optimiser (None: training-free); ``views`` the
    default number of augmented views per training image; ``test_view_only``: it trains on the test-transform
    features only (views = 0). ``init_head(ctx, config)``, where given, is the head before training, for methods
    that promise to start as zero-shot CLIP; ``files`` the names of the files its fit may add to a run folder.

    What the workflow asks of a config, each a function of it (None: nothing to ask): ``check_files(config)`` raises
    if a file it names is unusable, before any image is encoded; ``base_record(config)`` gives config.json's "base",
    the settings of a base that the method builds in place of the text classifier (None: the text classifier). For
    ``protocol="no-val"``, which selects nothing on a validation split: ``val_option(config)`` names the option by
    which ``config`` selects on the few-shot val split (None: it does not), which no-val refuses; and
    ``no_val_options(preset, options)`` the option values that make the method use its fixed values instead, which
    ``TrainConfig.resolve`` sets under no-val unless the user's ``options`` set them. ``adapt_backbone(run,
    backbone)``: for a method that changes the encoder, the encoder its run's head reads.
    """

    name: str
    summary: str
    config_cls: type
    head_cls: type[Head]
    fit: Callable[[FitContext, Any], Fitted]
    optim_preset: Callable[[int, str], OptimConfig] | None = None
    config_preset: Callable[[str], Any] | None = None
    # 50: the smallest bank whose accuracy matched online augmentation in docs/views-study.md
    views: int | Literal["online"] = 50
    test_view_only: bool = False
    init_head: Callable[[FitContext, Any], Head] | None = None
    files: tuple[str, ...] = ()  # files its fit may add to a run folder (Artifact names)
    official: OfficialVariant | None = None  # how --protocol official runs it; None: no official variant
    check_files: Callable[[Any], None] | None = None
    base_record: Callable[[Any], dict | None] | None = None
    val_option: Callable[[Any], str | None] | None = None
    no_val_options: Callable[[Any, Mapping[str, Any]], dict[str, Any]] | None = None
    # a method that trains through the encoders (CLIP-LoRA): the backbone its run's head reads, rebuilt from the
    # run folder and the run's backbone (eval, predict and export call it); None: the backbone as it is
    adapt_backbone: Callable[[Path, Backbone], Backbone] | None = None
    # optimiser settings the method does not read (CLIP-LoRA counts iterations, not epochs): refused by train with the
    # reason, left out of its cells by a sweep's grid, as a method option goes to the methods that take it
    unused_optim: tuple[str, ...] = ()
    unused_optim_reason: str = ""

    @property
    def trained(self) -> bool:
        return self.optim_preset is not None

    def default_config(self, dataset: str = "") -> Any:
        return self.config_preset(dataset) if self.config_preset is not None else self.config_cls()

    def options(self) -> list[dataclasses.Field]:
        """The config fields the user may set (see ``taskres.methods.base.option``)."""
        return config_options(self.config_cls)

    def configure(self, config: Any, **values: Any) -> Any:
        """``config`` with option values replaced (validated by the config's ``__post_init__``)."""
        known = {f.name for f in self.options()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TaskResValueError(
                f"method {self.name!r} has no option(s) {unknown}; its options: {sorted(known) or 'none'}.",
                param=unknown[0],
            )
        return dataclasses.replace(config, **values) if values else config


def searches_on_val(config: Any) -> str | None:
    """``Method.val_option`` of a method whose ``search`` option selects on the few-shot val split ("val") or uses
    fixed values ("none")."""
    return "search" if config.search == "val" else None


def search_none(preset: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """``Method.no_val_options`` of such a method: ``search`` none, its fixed values."""
    return {"search": "none"}


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method under its name; a second method with the same name is an error."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


_discovered = False


def discover() -> dict[str, Method]:
    """Import every public module beside this one (the package ``taskres.methods``) once, so that each registers
    itself; return the registry. The package's folder is found from this file, not by importing the package."""
    global _discovered
    if not _discovered:
        names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")]
        # TaskRes first (the default method, listed first by `taskres methods`), then by module name.
        for name in sorted(names, key=lambda name: (name != "taskres", name)):
            importlib.import_module(f"{__package__}.{name}")
        _discovered = True
    return METHODS


def method_files() -> list[str]:
    """The names of the files that any method's fit may add to a run folder."""
    return [name for method in discover().values() for name in method.files]


def option_flags() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every method option: ``{flag: (config field, names of the methods that take it)}``. One flag sets one
    field name in every method that declares it."""
    table: dict[str, tuple[str, list[str]]] = {}
    for method in discover().values():
        for f in method.options():
            flag = f.metadata["flag"]
            field_name, names = table.setdefault(flag, (f.name, []))
            if field_name != f.name:
                raise ValueError(
                    f"flag {flag} sets field {field_name!r} of one method and {f.name!r} of "
                    f"{method.name!r}; one flag must set one field name"
                )
            names.append(method.name)
    return {flag: (field_name, tuple(names)) for flag, (field_name, names) in table.items()}


def get_method(name: str) -> Method:
    methods = discover()
    if name not in methods:
        raise TaskResValueError(
            f"unknown method {name!r}; {suggest(name, methods)}known: {', '.join(methods)}.", param="method"
        )
    return methods[name]
