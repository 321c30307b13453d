"""The workflow as typed steps, each a short function that can be called on its own:

    sample_fewshot(dataset, K, seed)                        -> {"train": [...], "val": [...]} entries
    encode_features(backbone, dataset, fewshot, views, ...) -> Features (train views, labels, val, test)
    build_base_classifier(backbone, classnames, templates)  -> t (C, D)
    fit_method(method, ..., features, base)                 -> Fitted (head, info, extra heads, files)
    evaluate(head, features, labels, classnames)            -> metrics (the one evaluation of zeroshot, train, eval)
    open_run (a RunWriter)                                  -> the run folder

``zeroshot``, ``train``, ``evaluate_run`` and ``predict`` chain them as the CLI runs them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import torch

import taskres
from taskres import distributed
from taskres.atomic import write_json
from taskres.backbones import Backbone, BackboneIdentity, load_backbone
from taskres.cache import FeatureCache, check_writable_dir
from taskres.data.fewshot_file import load_fewshot_file
from taskres.data.images import DEFAULT_MAX_PIXELS, TRAIN_SCALE
from taskres.data.sampling import sample_fewshot
from taskres.data.sources import open_dataset, reopen_dataset
from taskres.data.splits import DatasetSource, DatasetSplits, Entry
from taskres.devices import parse_device
from taskres.engine import OptimConfig
from taskres.errors import TaskResValueError, check_choice, invalid
from taskres.evaluate import evaluate, predict_logits
from taskres.methods import FitContext, Fitted, Head, Method, OfficialVariant, discover, get_method
from taskres.methods.taskres import TaskResHead
from taskres.runs import CLASSIFIER, CONFIG, METRICS, open_run, read_classifier, read_run
from taskres.text import build_base_classifier, check_prompts_fit, normalized_text_classifier
from taskres.views import OnlineViews, ViewBank

logger = logging.getLogger(__name__)

ONLINE: Final = "online"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest seed

__all__ = [
    "Features",
    "Setup",
    "TrainConfig",
    "encode_features",
    "encode_split",
    "evaluate_run",
    "fit_method",
    "encode_training",
    "import_official",
    "load_run_backbone",
    "load_run_head",
    "open_dataset",
    "predict",
    "prepare_training",
    "reopen_dataset",
    "train",
    "zeroshot",
]


@dataclass(frozen=True)
class Setup:
    """How features are computed: device, precision, cache, encoder batch size, progress bars, bad images."""

    device: str = "cpu"
    precision: str = "fp32"
    cache_dir: str | None = None
    batch_size: int = 32
    workers: int | None = None  # image-decoding processes; None: auto (taskres.cache.loader_workers)
    quiet: bool = False
    skip_bad_images: bool = False
    weights_dir: str | None = None
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images are refused (None: no limit)

    def __post_init__(self) -> None:
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise invalid("max_image_pixels", "be >= 1 (pixels of the largest image to decode)", self.max_image_pixels)
        if self.batch_size < 1:
            raise invalid("batch_size", "be >= 1 (images per encoder batch)", self.batch_size)
        if self.workers is not None and self.workers < 0:
            raise invalid("workers", "be >= 0 (0 = load images in the main process)", self.workers)
        parse_device(self.device)

    def cache(self) -> FeatureCache:
        """The feature cache; under torchrun, the job's ranks encode through it together (taskres.distributed)."""
        return FeatureCache(
            self.cache_dir,
            batch_size=self.batch_size,
            workers=self.workers,
            quiet=self.quiet,
            max_pixels=self.max_image_pixels,
            cluster=distributed.current(),
        )

    def record(self) -> dict:
        return {"device": self.device, "precision": self.precision, "skip_bad_images": self.skip_bad_images}


@dataclass(frozen=True)
class TrainConfig:
    """A training run of one method. ``TrainConfig.preset(method, shots, seed, dataset)`` gives the method's
    published settings; the plain defaults are TaskRes's.

    ``method_config`` None means the method's default config; ``optim`` is None for training-free methods (it is
    set so).
    """

    shots: int
    seed: int
    method: str = "taskres"
    method_config: Any = None  # the method's config dataclass
    optim: OptimConfig | None = field(default_factory=OptimConfig)
    views: int | Literal["online"] = 10  # cached augmented views per image (0: test transform), or "online"
    fewshot_file: str | None = None  # the few-shot images from a file (Dassl's split_fewshot pickle, a run's split)
    # "official": the method as its public code runs it; "no-val": nothing is selected or tuned on a validation
    # split (CLAP's protocol): no val shots are drawn, and methods that search use their fixed values
    protocol: Literal["default", "official", "no-val"] = "default"

    @classmethod
    def preset(cls, method: str, shots: int, seed: int, dataset: str = "", **overrides) -> TrainConfig:
        """The method's published settings for ``dataset`` (a benchmark name, or "" for others); with
        ``protocol="official"`` among the overrides, the views of its public code."""
        spec = get_method(method)
        optim = spec.optim_preset(shots, dataset) if spec.optim_preset is not None else None
        views = spec.official.views if overrides.get("protocol") == "official" and spec.official else spec.views
        values = dict(method_config=spec.default_config(dataset), optim=optim, views=views)
        return cls(shots=shots, seed=seed, method=method, **{**values, **overrides})

    @classmethod
    def resolve(
        cls,
        method: str,
        shots: int,
        seed: int,
        dataset: str = "",
        options: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        views: int | Literal["online"] | None = None,
        protocol: Literal["default", "official", "no-val"] = "default",
        fewshot_file: str | None = None,
    ) -> TrainConfig:
        """The method's preset for ``dataset`` with the given settings on top: ``options`` (config fields of the
        method, e.g. ``{"alpha": 1.0}``), ``optim`` (OptimConfig fields, e.g. ``{"lr": 1e-3}``), ``views`` (default:
        the method's, or its public code's under the official protocol). What ``taskres train`` and ``taskres
        sweep`` run. Under ``protocol="no-val"`` a method's ``search`` defaults to "none" (its fixed values)."""
        spec = get_method(method)
        optim = dict(optim or {})
        options = dict(options or {})
        if protocol == "no-val" and "search" not in options and any(f.name == "search" for f in spec.options()):
            preset_config = spec.default_config(dataset)
            if (
                getattr(preset_config, "search", None) is not None
                or options.get("enhance_base")
                or options.get("base_weights")
            ):
                options["search"] = "none"
        if optim and not spec.trained:
            raise TaskResValueError(
                f"{', '.join(f'`{k}`' for k in optim)}: method {method!r} is training-free; drop the setting(s).",
                param=next(iter(optim)),
            )
        config = cls.preset(method, shots, seed, dataset)
        method_config = spec.configure(config.method_config, **options)
        optim_config = dataclasses.replace(config.optim, **optim) if config.optim is not None else None
        if views is None:
            views = spec.official.views if protocol == "official" and spec.official is not None else config.views
        return dataclasses.replace(
            config,
            method_config=method_config,
            optim=optim_config,
            views=views,
            fewshot_file=fewshot_file,
            protocol=protocol,
        )

    def __post_init__(self) -> None:
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1:
            raise invalid("shots", "be an integer >= 1 (images per class)", self.shots)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise invalid("seed", f"be an integer in [0, {MAX_SEED}] (the range of torch's generators)", self.seed)
        if self.views != ONLINE and (isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 0):
            raise invalid("views", "be an integer >= 0 (0 = no augmentation) or 'online'", self.views)
        spec = self.spec
        if self.method_config is None:
            object.__setattr__(self, "method_config", spec.default_config())
        if not isinstance(self.method_config, spec.config_cls):
            raise TaskResValueError(
                f"method {self.method!r} takes a {spec.config_cls.__name__}, got {type(self.method_config).__name__}.",
                param="method_config",
            )
        if not spec.trained:
            object.__setattr__(self, "optim", None)  # training-free: nothing is optimised
        elif not isinstance(self.optim, OptimConfig):
            raise TaskResValueError(
                f"method {self.method!r} is trained and needs an OptimConfig; got {self.optim!r}.", param="optim"
            )
        if self.views == ONLINE and (not spec.trained or spec.test_view_only):
            raise TaskResValueError(
                f"`views` online draws a fresh augmentation of every training image in every "
                f"epoch, but method {self.method!r} "
                f"{'is training-free' if not spec.trained else 'trains on the test transform'}; "
                f"use `views` {spec.views} (its default).",
                param="views",
            )
        check_choice("protocol", self.protocol, ("default", "official", "no-val"))
        if self.protocol == "no-val" and getattr(self.method_config, "search", None) == "val":
            raise TaskResValueError(
                f"`protocol` no-val selects nothing on a validation split, but method "
                f"{self.method!r} is set to search on it; set `search` none (with its fixed "
                "values).",
                param="search",
            )
        if self.protocol == "official":
            official = [name for name, m in discover().items() if m.official is not None]
            if spec.official is None:
                raise TaskResValueError(
                    f"`protocol` official runs a method as its public code does; method "
                    f"{self.method!r} has no official variant (methods with one: "
                    f"{', '.join(official)}).",
                    param="protocol",
                )
            if self.views != spec.official.views:
                raise TaskResValueError(
                    f"`protocol` official trains {self.method} on `views` "
                    f"{spec.official.views}, as its public code; got `views` {self.views}. "
                    "Drop the views setting.",
                    param="views",
                )
        if spec.test_view_only and self.views != 0:
            raise TaskResValueError(
                f"method {self.method!r} trains on the test-transform features of the few-shot "
                f"images (no augmentation); set `views` to 0 (its default); got {self.views}.",
                param="views",
            )

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    @property
    def official(self) -> OfficialVariant | None:
        return self.spec.official if self.protocol == "official" else None

    @property
    def selects_publicly(self) -> bool:
        """Whether the method's public code, which the official protocol follows, selects on the whole val split or
        on test (such a method also encodes those splits)."""
        return self.official is not None and self.official.selection == "public"

    @property
    def view_scale(self) -> tuple[float, float]:
        return self.official.view_scale if self.official is not None else TRAIN_SCALE

    def record(self) -> dict:
        """The run's training settings for config.json."""
        base = getattr(self.method_config, "enhanced_base", None)  # TaskRes*'s enhanced base, if any
        return {
            "method": self.method,
            "shots": self.shots,
            "seed": self.seed,
            "views": self.views,
            "fewshot_file": self.fewshot_file,
            "protocol": self.protocol,
            "view_scale": list(self.view_scale),
            "method_config": asdict(self.method_config),
            "optim": asdict(self.optim) if self.optim is not None else None,
            "base": asdict(base) if base is not None else None,
        }


@dataclass(frozen=True)
class Features:
    """The features of one run: the training views (a ViewBank of cached (V, N, D) views, or OnlineViews) with
    (N,) labels, the few-shot val split and the test split."""

    train_views: ViewBank | OnlineViews
    train_labels: torch.Tensor
    val: torch.Tensor | None
    val_labels: torch.Tensor | None
    test: torch.Tensor
    test_labels: torch.Tensor
    skipped_test: int = 0  # undecodable test images left out (with skip_bad_images)
    skipped_train: int = 0  # undecodable training images left out (with skip_bad_images)
    seconds: float = 0.0
    full_val: torch.Tensor | None = None  # the dataset's whole val split, for public code that selects on it
    full_val_labels: torch.Tensor | None = None


def encode_split(
    backbone: Backbone,
    dataset: DatasetSplits,
    entries: Sequence[Entry],
    setup: Setup,
    cache: FeatureCache,
    view: int | None = None,
    desc: str = "encoding",
    scale: tuple[float, float] = TRAIN_SCALE,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features (N, D), labels (N,), skipped paths for entries; undecodable images are dropped when skipping."""
    paths = [str(dataset.path(e)) for e in entries]
    feats, skipped = cache.features(
        backbone,
        paths,
        view=view,
        skip_bad=setup.skip_bad_images,
        desc=desc,
        names=[e.impath for e in entries],
        scale=scale,
    )
    labels = torch.tensor([e.label for e in entries], dtype=torch.long)
    if skipped:
        gone = set(skipped)
        keep = torch.tensor([p not in gone for p in paths])
        feats, labels = feats[keep], labels[keep]
    return feats, labels, skipped


def encode_features(
    backbone: Backbone,
    dataset: DatasetSplits,
    fewshot: dict[str, list[Entry]],
    views: int | Literal["online"],
    setup: Setup,
    seed: int = 0,
    cache: FeatureCache | None = None,
    scale: tuple[float, float] = TRAIN_SCALE,
    full_val: bool = False,
) -> Features:
    """Encode (or read from the cache) the training views, the test split and the few-shot val split.

    ``views`` 0 encodes the training images with the test transform; V > 0 encodes V augmented views of each (a
    ViewBank drawn with ``seed``); "online" encodes nothing for training now: each epoch encodes fresh
    augmentations (OnlineViews, seeded by ``seed``). ``scale`` is RandomResizedCrop's scale range. ``full_val``
    also encodes the dataset's whole val split (the official protocol of methods whose public code selects on it).
    """
    t0 = time.perf_counter()
    if views == ONLINE and setup.skip_bad_images:
        raise TaskResValueError(
            "`skip_bad_images` cannot be used with `views` online (every epoch reads every "
            "training image); fix or remove the bad images, or use cached views.",
            param="skip_bad_images",
        )
    cache = cache if cache is not None else setup.cache()
    test, test_labels, skipped = encode_split(backbone, dataset, dataset.test, setup, cache, desc="test")
    val, val_labels = None, None
    if fewshot["val"]:
        val, val_labels, _ = encode_split(backbone, dataset, fewshot["val"], setup, cache, desc="val")
    extra: dict[str, Any] = {}
    if full_val and dataset.val:
        all_val, all_val_labels, _ = encode_split(backbone, dataset, dataset.val, setup, cache, desc="full val")
        extra = dict(full_val=all_val, full_val_labels=all_val_labels)
    if views == ONLINE:
        entries = fewshot["train"]
        online = OnlineViews(
            backbone,
            [str(dataset.path(e)) for e in entries],
            [e.impath for e in entries],
            seed,
            setup.batch_size,
            setup.workers,
            scale,
            max_pixels=setup.max_image_pixels,
        )
        labels = torch.tensor([e.label for e in entries], dtype=torch.long)
        return Features(
            online,
            labels,
            val,
            val_labels,
            test,
            test_labels,
            skipped_test=len(skipped),
            seconds=time.perf_counter() - t0,
            **extra,
        )
    view_ids: list[int | None] = [None] if views == 0 else list(range(views))
    train_views: list[torch.Tensor] = []
    train_labels: torch.Tensor | None = None
    skipped_train: list[str] = []
    for v in view_ids:
        desc = "train" if v is None else f"train view {v + 1}/{views}"
        feats, labels, skipped_train = encode_split(
            backbone, dataset, fewshot["train"], setup, cache, view=v, desc=desc, scale=scale
        )
        if train_labels is not None and not torch.equal(labels, train_labels):
            raise TaskResValueError(
                "the training images decoded differently across views; re-run without "
                "skip_bad_images to see which image fails.",
                param="skip_bad_images",
            )
        train_views.append(feats)
        train_labels = labels
    assert train_labels is not None  # view_ids is never empty
    if skipped_train:
        left = set(train_labels.tolist())
        empty = [name for label, name in enumerate(dataset.classnames) if label not in left]
        if empty:
            raise TaskResValueError(
                f"`skip_bad_images` left class(es) {empty[:10]} with no training image (skipped: "
                f"{skipped_train[:5]}); fix or replace those images.",
                param="skip_bad_images",
            )
    bank = ViewBank(torch.stack(train_views), seed)  # (V, N, D)
    return Features(
        bank,
        train_labels,
        val,
        val_labels,
        test,
        test_labels,
        skipped_test=len(skipped),
        skipped_train=len(skipped_train),
        seconds=time.perf_counter() - t0,
        **extra,
    )


def fit_method(
    config: TrainConfig,
    features: Features,
    base: torch.Tensor,
    backbone: Backbone,
    dataset: DatasetSplits,
    setup: Setup,
    on_epoch: Callable[[dict], None] | None = None,
) -> Fitted:
    """Fit the configured method on the features, starting from the base classifier (C, D). Under the official
    protocol, a method whose public code selects on other splits gets them (the whole val split, the test split)."""
    selection: dict[str, Any] = {}
    if config.selects_publicly:
        selection = dict(
            test_features=features.test,
            test_labels=features.test_labels,
            full_val_features=features.full_val,
            full_val_labels=features.full_val_labels,
        )
    ctx = FitContext(
        base=base,
        logit_scale=backbone.logit_scale,
        train_views=features.train_views,
        train_labels=features.train_labels,
        val_features=features.val,
        val_labels=features.val_labels,
        optim=config.optim,
        seed=config.seed,
        classnames=dataset.classnames,
        templates=dataset.templates,
        shots=config.shots,
        dataset=dataset.name,
        backbone=backbone,
        device=setup.device,
        quiet=setup.quiet,
        on_epoch=on_epoch,
        protocol=config.protocol,
        **selection,
    )
    fitted = config.spec.fit(ctx, config.method_config)
    fitted.head = fitted.head.cpu()
    return fitted


def run_record(kind: str, backbone: Backbone, dataset: DatasetSplits, setup: Setup, **extra) -> dict:
    """config.json: versions, backbone identity, dataset source and split hash, setup, and ``extra``."""
    return {
        "kind": kind,
        "taskres_version": taskres.__version__,
        "torch_version": torch.__version__,
        "backbone": backbone.identity.to_json(),
        "dataset": {
            "name": dataset.name,
            **(dataset.source.to_json() if dataset.source else {}),
            "num_classes": dataset.num_classes,
            "templates": list(dataset.templates),
            "split_hash": dataset.split_hash,
        },
        "setup": setup.record(),
        **extra,
    }


def _helper_rank(cache: FeatureCache | None) -> bool:
    """Whether this process is a rank other than 0 of a torchrun job encoding through ``cache`` (None: the cache
    that ``Setup.cache`` makes, which joins the job): it encodes its share of a run's features, and rank 0 alone
    trains, evaluates and writes the run (taskres.distributed)."""
    cluster = distributed.current() if cache is None else cache.cluster
    return cluster is not None and cluster.active and not cluster.is_main


def _all_method_files() -> list[str]:
    return [name for method in discover().values() for name in method.files]


def zeroshot(
    backbone: Backbone,
    dataset: DatasetSplits,
    setup: Setup,
    out: str | Path | None = None,
    overwrite: bool = False,
    protocol: Literal["default", "official"] = "default",
    cache: FeatureCache | None = None,
) -> dict:
    """Zero-shot accuracy on the test split; writes a run folder when ``out`` is given.

    ``protocol`` "default": the TaskRes base at initialisation (mean un-normalised embedding over the dataset's
    templates, names as written). "official": CoOp's ``ZeroshotCLIP``, the paper's zero-shot row (one template per
    benchmark, "_" replaced by a space, each prompt's feature normalised).
    """
    check_choice("protocol", protocol, ("default", "official"))
    if _helper_rank(cache):
        encode_split(backbone, dataset, dataset.test, setup, cache or setup.cache(), desc="test")
        return {}
    with open_run(out, overwrite, _all_method_files()) as writer:
        if protocol == "official":
            from taskres.data.benchmarks import coop_zeroshot_templates

            templates = coop_zeroshot_templates(dataset)
            classifier = normalized_text_classifier(backbone, dataset.classnames, templates)
        else:
            templates = dataset.templates
            classifier = build_base_classifier(backbone, dataset.classnames, templates)
        head = TaskResHead(classifier, backbone.logit_scale)
        test, labels, skipped = encode_split(
            backbone, dataset, dataset.test, setup, cache or setup.cache(), desc="test"
        )
        metrics = evaluate(head, test, labels, dataset.classnames)
        metrics.update(zero_shot_accuracy=metrics["accuracy"], skipped_images=len(skipped), protocol=protocol)
        if writer is not None:
            writer.finish(
                run_record(
                    "zeroshot",
                    backbone,
                    dataset,
                    setup,
                    method="zero-shot",
                    protocol=protocol,
                    zeroshot_templates=list(templates),
                ),
                head,
                "taskres",
                dataset.classnames,
                dataset.class_ids,
                metrics,
            )
        return metrics


def prepare_training(
    backbone: Backbone, dataset: DatasetSplits, config: TrainConfig
) -> tuple[dict[str, list[Entry]], dict]:
    """The checks that ``train`` makes before any encoding, then the few-shot draw: (splits, few-shot file info)."""
    if not dataset.train:
        raise TaskResValueError(
            f"dataset {dataset.name!r} has no training split (it is an evaluation-only set); "
            "train on imagenet and evaluate the run with `taskres eval --run RUN --dataset "
            f"{dataset.name}`.",
            param="dataset",
        )
    check = getattr(config.method_config, "check", None)
    if check is not None:  # checks that read files, before any encoding
        check()
    normalized = config.official is not None and config.official.base == "normalized_templates"
    check_prompts_fit(backbone, dataset.classnames, dataset.templates, replace_underscores=normalized)
    return draw_fewshot(dataset, config)


def encode_training(
    backbone: Backbone, dataset: DatasetSplits, config: TrainConfig, setup: Setup, cache: FeatureCache | None = None
) -> Features:
    """Encode (or find in the cache) every feature that ``train`` with ``config`` reads, without training."""
    fewshot, _ = prepare_training(backbone, dataset, config)
    return _training_features(backbone, dataset, config, fewshot, setup, cache)


def _training_features(
    backbone: Backbone,
    dataset: DatasetSplits,
    config: TrainConfig,
    fewshot: dict[str, list[Entry]],
    setup: Setup,
    cache: FeatureCache | None,
) -> Features:
    return encode_features(
        backbone,
        dataset,
        fewshot,
        config.views,
        setup,
        seed=config.seed,
        scale=config.view_scale,
        cache=cache,
        full_val=config.selects_publicly,
    )


def train(
    backbone: Backbone,
    dataset: DatasetSplits,
    config: TrainConfig,
    setup: Setup,
    out: str | Path | None = None,
    overwrite: bool = False,
    cache: FeatureCache | None = None,
) -> tuple[Head | None, dict]:
    """Sample K shots for the seed, fit the method on cached features, evaluate on test; return (head, metrics).
    ``cache``: a FeatureCache to share between runs (its features stay in memory); default ``setup.cache()``.
    On the other ranks of a torchrun job: their share of the encoding only, and (None, {})."""
    fewshot, fewshot_info = prepare_training(backbone, dataset, config)
    if _helper_rank(cache):
        _training_features(backbone, dataset, config, fewshot, setup, cache)
        return None, {}
    with open_run(out, overwrite, _all_method_files()) as writer:
        if writer is not None:
            writer.write_split(fewshot)
        features = _training_features(backbone, dataset, config, fewshot, setup, cache)
        base = base_classifier(backbone, dataset, config.official)
        zero_shot = evaluate(
            TaskResHead(base, backbone.logit_scale), features.test, features.test_labels, dataset.classnames
        )
        log = writer.epoch_log() if writer is not None else None
        t0 = time.perf_counter()
        try:
            fitted = fit_method(config, features, base, backbone, dataset, setup, on_epoch=log)
        finally:
            if log is not None:
                log.close()
        seconds_train = time.perf_counter() - t0
        metrics = train_metrics(fitted, features, dataset, zero_shot["accuracy"], seconds_train)
        metrics.update(protocol=config.protocol, test_selected=bool(metrics.get("test_selected", False)))
        if writer is not None:
            for artifact in fitted.artifacts:
                path = writer.write_file(artifact.filename, artifact.write)
                if artifact.metrics_key:
                    metrics[artifact.metrics_key] = str(path)
            record = run_record("train", backbone, dataset, setup, **config.record())
            if fewshot_info:
                record["fewshot_file_sha256"] = fewshot_info["fewshot_file_sha256"]
            writer.finish(record, fitted.head, config.method, dataset.classnames, dataset.class_ids, metrics)
        return fitted.head, metrics


def base_classifier(
    backbone: Backbone, dataset: DatasetSplits, official: OfficialVariant | None = None
) -> torch.Tensor:
    """The base classifier t (C, D): the mean text embedding over the dataset's templates, or what the method's
    public code uses under the official protocol (the same in fp16, or per-template normalised with "_" replaced)."""
    if official is not None and official.base == "normalized_templates":
        return normalized_text_classifier(backbone, dataset.classnames, dataset.templates)
    precision: Literal["fp32", "fp16"] = "fp16" if official is not None and official.base == "fp16_text" else "fp32"
    return build_base_classifier(backbone, dataset.classnames, dataset.templates, text_precision=precision)


def draw_fewshot(dataset: DatasetSplits, config: TrainConfig) -> tuple[dict[str, list[Entry]], dict]:
    """The few-shot entries of a run: the official draw for (K, seed), or the images of ``config.fewshot_file``
    (whose K must be ``config.shots``); and the file's info (empty for a draw)."""
    info: dict[str, Any]
    if config.fewshot_file is None:
        fewshot, info = sample_fewshot(dataset, config.shots, config.seed), {}
    else:
        fewshot, info = load_fewshot_file(config.fewshot_file, dataset)
    if config.protocol == "no-val":  # the train draw is the same: the official val draw comes after it
        fewshot = {**fewshot, "val": []}
    if config.fewshot_file is None:
        return fewshot, info
    if info["shots"] != config.shots:
        raise invalid(
            "shots", f"agree with the few-shot file, which holds up to {info['shots']} images per class", config.shots
        )
    return fewshot, info


def train_metrics(
    fitted: Fitted, features: Features, dataset: DatasetSplits, zero_shot_accuracy: float, seconds_train: float
) -> dict:
    """metrics.json of a trained run: test metrics, zero-shot accuracy, sizes, timings, val accuracy, the
    accuracy of the method's extra heads and the method's own values."""
    metrics = evaluate(fitted.head, features.test, features.test_labels, dataset.classnames)
    metrics.update(
        zero_shot_accuracy=zero_shot_accuracy,
        skipped_images=features.skipped_test + features.skipped_train,
        skipped_train_images=features.skipped_train,
        skipped_test_images=features.skipped_test,
        n_train=int(len(features.train_labels)),
        train_encoder_passes=train_encoder_passes(features),
        seconds_features=round(features.seconds, 3),
        seconds_train=round(seconds_train, 3),
    )
    if features.val is not None and len(features.val):
        assert features.val_labels is not None  # given with the val features
        metrics["val_accuracy"] = evaluate(fitted.head, features.val, features.val_labels, dataset.classnames)[
            "accuracy"
        ]
    for name, head in fitted.extra_heads.items():
        metrics[f"{name}_accuracy"] = evaluate(head, features.test, features.test_labels, dataset.classnames)[
            "accuracy"
        ]
    metrics.update(fitted.info)
    return metrics


def train_encoder_passes(features: Features) -> int:
    """Images run through the image encoder for training: V x N for a bank of V views (whether encoded now or
    read from the cache), every online draw so far for online views."""
    views = features.train_views
    return views.encoded if isinstance(views, OnlineViews) else views.num_views * views.num_samples


def import_official(
    checkpoint: str | Path,
    backbone: Backbone,
    dataset: DatasetSplits,
    setup: Setup,
    alpha: float | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[TaskResHead, dict]:
    """A residual trained by the official code (Dassl's ``prompt_learner/model.pth.tar-<epoch>``, read safely), as a
    TaskRes head evaluated on ``dataset``'s test split; a run folder for ``eval`` and ``predict`` when ``out`` is
    given. ``alpha`` is not in the file (docs/protocol.md#official-checkpoints): default the paper's, 0.5 (1.0 on
    Flowers102)."""
    from taskres.methods.taskres import TaskResConfig, config_preset
    from taskres.safe_load import load_checkpoint

    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint, "official checkpoint")
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    names = ("base_text_features", "text_feature_residuals")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor) for k in names):
        raise TaskResValueError(
            f"official checkpoint {str(checkpoint)!r} has no state_dict with base_text_features "
            "and text_feature_residuals; pass a prompt_learner/model.pth.tar-<epoch> written by "
            "the official TaskRes trainer.",
            param="checkpoint",
        )
    base, residual = (state[k].float() for k in names)
    want = (dataset.num_classes, backbone.embed_dim)
    for name, t in zip(names, (base, residual)):
        if tuple(t.shape) != want:
            raise TaskResValueError(
                f"official checkpoint {str(checkpoint)!r}: {name} is {tuple(t.shape)}, but "
                f"dataset {dataset.name!r} with backbone {backbone.identity.spec!r} needs {want} "
                "(classes x embedding dim); use the checkpoint of this dataset and backbone.",
                param="checkpoint",
            )
    config = TaskResConfig(alpha=alpha) if alpha is not None else config_preset(dataset.name)
    with open_run(out, overwrite, _all_method_files()) as writer:
        head = TaskResHead(base, backbone.logit_scale, config)
        with torch.no_grad():
            head.text_feature_residuals.copy_(residual)
        test, labels, skipped = encode_split(backbone, dataset, dataset.test, setup, setup.cache(), desc="test")
        ours = build_base_classifier(backbone, dataset.classnames, dataset.templates)
        metrics = evaluate(head, test, labels, dataset.classnames)
        metrics.update(
            zero_shot_accuracy=evaluate(TaskResHead(ours, backbone.logit_scale), test, labels, dataset.classnames)[
                "accuracy"
            ],
            imported_base_accuracy=evaluate(TaskResHead(base, backbone.logit_scale), test, labels, dataset.classnames)[
                "accuracy"
            ],
            # How far the file's base is from ours (fp16 text encoder, templates): a check of the setup.
            base_relative_difference=float((base - ours).norm() / ours.norm()),
            residual_mean_abs=head.residual_mean_abs(),
            skipped_images=len(skipped),
            checkpoint_epoch=ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        )
        if writer is not None:
            import hashlib

            record = run_record(
                "import",
                backbone,
                dataset,
                setup,
                method="taskres",
                method_config=asdict(config),
                checkpoint=str(checkpoint.resolve()),
                checkpoint_sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
            )
            writer.finish(record, head, "taskres", dataset.classnames, dataset.class_ids, metrics)
        return head, metrics


def load_run_backbone(config: dict, setup: Setup, precision: str | None = None) -> Backbone:
    """Reload the backbone a run used (a Hub model at the commit it used) and check it is the same weights; at the
    run's precision unless ``precision`` is given."""
    try:
        recorded = BackboneIdentity.from_json(config["backbone"])
    except (KeyError, TypeError, ValueError) as err:
        raise TaskResValueError(
            f"the run's config.json has a damaged backbone record ({type(err).__name__}: "
            f"{err}); it was edited. Re-run training.",
            param="run",
        ) from None
    backbone = load_backbone(
        recorded.reload_spec(),
        device=setup.device,
        precision=precision or recorded.precision,
        weights_dir=setup.weights_dir,
    )
    difference = backbone.identity.difference(recorded)
    if difference is not None:
        raise TaskResValueError(
            f"the backbone {recorded.spec!r} on this machine differs from the one the run used ({difference}).",
            param="backbone",
        )
    return backbone


def load_run_head(run: Path) -> tuple[Head, list[str], list[str]]:
    """(head, class names, class ids or []) of a run's classifier.safetensors, rebuilt by its method."""
    method, tensors, meta, classnames, class_ids = read_classifier(run / CLASSIFIER)
    try:
        head = get_method(method).head_cls.from_export(tensors, meta)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        if isinstance(err, TaskResValueError):
            raise
        raise TaskResValueError(
            f"classifier file {str(run / CLASSIFIER)!r} cannot be rebuilt as a {method} head "
            f"({type(err).__name__}: {err}); its metadata was edited or damaged. Re-run "
            "training.",
            param="run",
        ) from None
    return head, classnames, class_ids


def evaluate_run(
    run: str | Path,
    setup: Setup,
    dataset: DatasetSplits | None = None,
    out: str | Path | None = None,
    backbone: Backbone | None = None,
    cache: FeatureCache | None = None,
) -> dict:
    """Re-evaluate a run's classifier on its own test split, or on ``dataset``'s."""
    run, config = read_run(run)
    if _helper_rank(cache):
        out = None  # under torchrun, rank 0 alone writes
    if out is not None and (Path(out) / CONFIG).exists():
        raise TaskResValueError(
            f"out {str(out)!r} is a run folder; its metrics.json would be replaced. Write the "
            f"evaluation elsewhere, e.g. {str(Path(run) / 'eval')}.",
            param="out",
        )
    if out is not None:  # before the evaluation, which may take minutes
        if Path(out).exists() and not Path(out).is_dir():
            raise TaskResValueError(
                f"out {str(out)!r} exists and is not a folder; choose another path for metrics.json.", param="out"
            )
        check_writable_dir(Path(out), "out")
    head, classnames, class_ids = load_run_head(run)
    if dataset is None:
        recorded = config["dataset"]
        try:
            dataset = reopen_dataset(DatasetSource.from_json(recorded), recorded["templates"])
            split_hash = recorded["split_hash"]
        except (KeyError, TypeError) as err:
            raise TaskResValueError(
                f"run {str(run)!r}: config.json has a damaged dataset record ({type(err).__name__}"
                f": {err}); it was edited. Re-run training.",
                param="run",
            ) from None
        if dataset.split_hash != split_hash:
            raise TaskResValueError(
                f"the dataset of run {str(run)!r} has changed since it was trained (its split "
                "entries differ from the ones recorded); pass --data/--split-file or "
                "--dataset/--root to evaluate on the dataset as it is now, knowingly.",
                param="dataset",
            )
    if class_ids and dataset.class_ids and list(dataset.class_ids) != class_ids:
        from taskres.data.benchmarks import map_class_rows

        # Domain generalisation: keep the rows of the target's classes, matched by WordNet id
        # (docs/protocol.md#evaluation).
        head = head.select_classes(
            map_class_rows(class_ids, dataset.class_ids, config["dataset"]["name"], dataset.name)
        )
    elif list(dataset.classnames) != list(classnames):
        raise TaskResValueError(
            f"dataset {dataset.name!r} has classes {list(dataset.classnames)[:5]}... but run "
            f"{str(run)!r} was trained on {classnames[:5]}...; evaluate on a dataset with the "
            "same classes in the same order (or an ImageNet variant for an ImageNet run).",
            param="dataset",
        )
    if backbone is None:
        backbone = load_run_backbone(config, setup)
    elif (difference := backbone.identity.difference(BackboneIdentity.from_json(config["backbone"]))) is not None:
        raise TaskResValueError(
            f"the backbone given differs from the one run {str(run)!r} used ({difference}).", param="backbone"
        )
    test, labels, skipped = encode_split(backbone, dataset, dataset.test, setup, cache or setup.cache(), desc="test")
    metrics = evaluate(head, test, labels, dataset.classnames)
    metrics.update(skipped_images=len(skipped), run=str(run), dataset=dataset.name)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / METRICS, metrics)
    return metrics


def predict(run: str | Path, images: Sequence[str | Path], setup: Setup, top_k: int = 5) -> list[dict]:
    """Top-k classes with probabilities for each image: ``[{"image", "top": [{"class", "prob"}, ...]}, ...]``."""
    run, config = read_run(run)
    if top_k < 1:
        raise invalid("top_k", "be >= 1", top_k)
    head, classnames, _ = load_run_head(run)
    backbone = load_run_backbone(config, setup)
    feats, _ = FeatureCache(None, batch_size=setup.batch_size, quiet=True, max_pixels=setup.max_image_pixels).features(
        backbone, images
    )
    probs = predict_logits(head, feats).softmax(dim=1)  # (N, C)
    if probs.shape[1] != len(classnames):
        raise TaskResValueError(
            f"run {str(run)!r}: the classifier has {probs.shape[1]} classes but its metadata "
            f"names {len(classnames)}; the file was edited or damaged. Re-run training.",
            param="run",
        )
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [
        {
            "image": str(img),
            "top": [
                {"class": classnames[j], "prob": float(p)}
                for p, j in zip(top.values[i].tolist(), top.indices[i].tolist())
            ],
        }
        for i, img in enumerate(images)
    ]
