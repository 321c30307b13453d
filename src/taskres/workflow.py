"""The workflow as typed steps, each a short function that can be called on its own:

    prepare_training(backbone, dataset, config)             -> the few-shot draw, after the checks before encoding
    training_features(backbone, dataset, config, fewshot)   -> Features (taskres.features)
    base_classifier(backbone, dataset, official)            -> t (C, D)
    fit_method(config, features, base, ...)                 -> Fitted (head, info, extra heads, files)
    adapted_features(encoder, dataset, fewshot, features)   -> Features through an adapted encoder (CLIP-LoRA)
    train_metrics(fitted, features, dataset, ...)           -> metrics.json of a trained run
    open_run (a RunWriter)                                  -> the run folder

``train`` and ``zeroshot`` chain them as the CLI runs them. Zero-shot CLIP is a method like the others
(``taskres.methods.zero_shot``): ``zeroshot`` evaluates it alone, ``train`` beside the method it trains. Re-using a
finished run (``evaluate_run``, ``predict``) is ``taskres.reuse``; the configuration, ``taskres.config``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from taskres.backbones import Backbone
from taskres.backbones.official import official_image_backbone
from taskres.cache import FeatureCache
from taskres.config import Setup, TrainConfig
from taskres.data.fewshot_file import load_fewshot_file
from taskres.data.sampling import sample_fewshot
from taskres.data.splits import DatasetSplits, Entry
from taskres.errors import TaskResValueError, check_choice, invalid
from taskres.evaluate import evaluate
from taskres.features import Features, encode_split, helper_rank, train_encoder_passes, training_features
from taskres.methods import FitContext, Fitted, Head, OfficialVariant, get_method
from taskres.methods.registry import method_files
from taskres.methods.zero_shot import ZERO_SHOT, zero_shot_head
from taskres.run_writer import open_run
from taskres.runs import run_record
from taskres.text import (
    build_base_classifier,
    check_prompts_fit,
    normalized_text_classifier,
    zeroshot_clip_classifier,
)

__all__ = [
    "base_classifier",
    "base_templates",
    "draw_fewshot",
    "encode_training",
    "fit_method",
    "prepare_training",
    "train",
    "train_metrics",
    "zeroshot",
]


def base_templates(dataset: DatasetSplits, official: OfficialVariant | None = None) -> Sequence[str]:
    """The templates of the base classifier: the dataset's, or the ones the method's public code uses under the
    official protocol (CoOp's ``ZeroshotCLIP``: one per benchmark)."""
    if official is not None and official.templates == "coop_zeroshot":
        from taskres.data.benchmarks import coop_zeroshot_templates

        return coop_zeroshot_templates(dataset)
    return dataset.templates


def base_classifier(
    backbone: Backbone, dataset: DatasetSplits, official: OfficialVariant | None = None
) -> torch.Tensor:
    """The base classifier t (C, D): the mean text embedding over the dataset's templates, or what the method's
    public code uses under the official protocol (the same in fp16, or per-template normalised with "_" replaced,
    in fp32 or as CoOp's ``ZeroshotCLIP`` computes it in fp16)."""
    templates = base_templates(dataset, official)
    if official is not None and official.base == "normalized_templates":
        return normalized_text_classifier(backbone, dataset.classnames, templates)
    if official is not None and official.base == "zeroshot_clip":
        return zeroshot_clip_classifier(backbone, dataset.classnames, templates)
    precision: Literal["fp32", "fp16"] = "fp16" if official is not None and official.base == "fp16_text" else "fp32"
    return build_base_classifier(backbone, dataset.classnames, templates, text_precision=precision)


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
    config.check_files()
    normalized = config.official is not None and config.official.base in ("normalized_templates", "zeroshot_clip")
    templates = base_templates(dataset, config.official)
    check_prompts_fit(backbone, dataset.classnames, templates, replace_underscores=normalized)
    return draw_fewshot(dataset, config)


def encode_training(
    backbone: Backbone, dataset: DatasetSplits, config: TrainConfig, setup: Setup, cache: FeatureCache | None = None
) -> Features:
    """Encode (or find in the cache) every feature that ``train`` with ``config`` reads, without training."""
    fewshot, _ = prepare_training(backbone, dataset, config)
    return training_features(backbone, dataset, config, fewshot, setup, cache)


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
    protocol, a method whose public code selects on other splits is shown them (the whole val split, the test
    split)."""
    ctx = FitContext(
        base=base,
        logit_scale=backbone.logit_scale,
        features=features,
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
        public_selection=config.selects_publicly,
    )
    fitted = config.spec.fit(ctx, config.method_config)
    fitted.head = fitted.head.cpu()
    return fitted


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

    ``protocol`` "default": the base that methods start from (mean un-normalised embedding over the dataset's
    templates, names as written). "official": the zero-shot method's official variant, CoOp's ``ZeroshotCLIP``, the
    paper's zero-shot row (one template per benchmark, "_" replaced by a space, each prompt's feature normalised).
    """
    check_choice("protocol", protocol, ("default", "official"))
    official = get_method(ZERO_SHOT).official if protocol == "official" else None
    backbone = official_image_backbone(backbone, official.base if official is not None else None)
    if helper_rank(cache):
        encode_split(backbone, dataset, dataset.test, setup, cache or setup.cache(), desc="test")
        return {}
    with open_run(out, overwrite, method_files()) as writer:
        templates = base_templates(dataset, official)
        head = zero_shot_head(base_classifier(backbone, dataset, official), backbone.logit_scale)
        test, labels, skipped = encode_split(
            backbone, dataset, dataset.test, setup, cache or setup.cache(), desc="test"
        )
        metrics = evaluate(head, test, labels, dataset.classnames)
        metrics.update(zero_shot_accuracy=metrics["accuracy"], skipped_images=len(skipped), protocol=protocol)
        if writer is not None:
            record = run_record(
                "zeroshot",
                backbone,
                dataset,
                setup,
                method=ZERO_SHOT,
                protocol=protocol,
                zeroshot_templates=list(templates),
            )
            writer.finish(record, head, ZERO_SHOT, dataset.classnames, dataset.class_ids, metrics)
        return metrics


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
    On the other ranks of a torchrun job: their share of the encoding only, and (None, {}). Under the TaskRes
    trainer's official variant the images are encoded, and the backbone recorded, as that trainer encodes them."""
    fewshot, fewshot_info = prepare_training(backbone, dataset, config)
    backbone = official_image_backbone(backbone, config.official.base if config.official is not None else None)
    if helper_rank(cache):
        training_features(backbone, dataset, config, fewshot, setup, cache)
        return None, {}
    with open_run(out, overwrite, method_files()) as writer:
        if writer is not None:
            writer.write_split(fewshot)
        features = training_features(backbone, dataset, config, fewshot, setup, cache)
        base = base_classifier(backbone, dataset, config.official)
        zero_shot = evaluate(
            zero_shot_head(base, backbone.logit_scale), features.test, features.test_labels, dataset.classnames
        )
        log = writer.epoch_log() if writer is not None else None
        t0 = time.perf_counter()
        try:
            fitted = fit_method(config, features, base, backbone, dataset, setup, on_epoch=log)
        finally:
            if log is not None:
                log.close()
        seconds_train = time.perf_counter() - t0
        if fitted.backbone is not None:
            features = adapted_features(fitted.backbone, dataset, fewshot, features, setup)
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


def adapted_features(
    encoder: Backbone, dataset: DatasetSplits, fewshot: dict[str, list[Entry]], features: Features, setup: Setup
) -> Features:
    """``features`` with the test and few-shot val splits encoded again through the encoder a method adapted
    (CLIP-LoRA's merged adapters), held in memory only: they belong to this run alone. The zero-shot accuracy
    was read off the shared features before."""
    t0 = time.perf_counter()
    cache = FeatureCache(
        None, batch_size=setup.batch_size, workers=setup.workers, quiet=setup.quiet, max_pixels=setup.max_image_pixels
    )
    test, test_labels, _ = encode_split(encoder, dataset, dataset.test, setup, cache, desc="test (adapted)")
    val, val_labels = features.val, features.val_labels
    if fewshot["val"]:
        val, val_labels, _ = encode_split(encoder, dataset, fewshot["val"], setup, cache, desc="val (adapted)")
    seconds = features.seconds + time.perf_counter() - t0
    return dataclasses.replace(
        features, test=test, test_labels=test_labels, val=val, val_labels=val_labels, seconds=seconds
    )


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
