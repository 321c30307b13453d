"""The features a run reads, encoded through the feature cache: the training views of the few-shot images, the
few-shot val split, the test split (and, for public code that selects on it, the dataset's whole val split).

    encode_split(backbone, dataset, entries, ...)              -> (N, D) features, (N,) labels, skipped paths
    encode_features(backbone, dataset, fewshot, views, ...)    -> Features
    training_features(backbone, dataset, config, fewshot, ...) -> Features, as a TrainConfig asks
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import torch

from taskres import distributed
from taskres.backbones import Backbone
from taskres.backbones.official import official_image_backbone
from taskres.cache import FeatureCache
from taskres.data.images import TRAIN_SCALE
from taskres.data.splits import DatasetSplits, Entry
from taskres.errors import TaskResValueError
from taskres.views import OnlineViews, TrainViews, ViewBank

if TYPE_CHECKING:
    from taskres.config import Setup, TrainConfig

ONLINE: Final = "online"


@dataclass(frozen=True)
class Features:
    """The features of one run: the training views (a ViewBank of cached (V, N, D) views, or OnlineViews; a
    (V, N, D) tensor from a caller that builds them itself) with (N,) labels, the few-shot val split and the test
    split."""

    train_views: TrainViews | torch.Tensor
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
    """Encode (or read from the cache) the test split, the few-shot val split and the training views.

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
    evaluation = _evaluation_splits(backbone, dataset, fewshot["val"], setup, cache, full_val)
    train: ViewBank | OnlineViews
    skipped: list[str] = []
    if views == ONLINE:
        train = _online_views(backbone, dataset, fewshot["train"], setup, seed, scale)
        labels = torch.tensor([e.label for e in fewshot["train"]], dtype=torch.long)
    else:
        train, labels, skipped = _view_bank(backbone, dataset, fewshot["train"], views, setup, cache, seed, scale)
    return Features(train, labels, **evaluation, skipped_train=len(skipped), seconds=time.perf_counter() - t0)


def _evaluation_splits(
    backbone: Backbone,
    dataset: DatasetSplits,
    val: list[Entry],
    setup: Setup,
    cache: FeatureCache,
    full_val: bool,
) -> dict[str, Any]:
    """The Features fields of the splits that are only evaluated on: test, the few-shot val, the whole val split."""
    test, test_labels, skipped = encode_split(backbone, dataset, dataset.test, setup, cache, desc="test")
    splits: dict[str, Any] = dict(test=test, test_labels=test_labels, skipped_test=len(skipped))
    splits["val"], splits["val_labels"] = None, None
    if val:
        splits["val"], splits["val_labels"], _ = encode_split(backbone, dataset, val, setup, cache, desc="val")
    if full_val and dataset.val:
        all_val, all_val_labels, _ = encode_split(backbone, dataset, dataset.val, setup, cache, desc="full val")
        splits.update(full_val=all_val, full_val_labels=all_val_labels)
    return splits


def _online_views(
    backbone: Backbone,
    dataset: DatasetSplits,
    entries: list[Entry],
    setup: Setup,
    seed: int,
    scale: tuple[float, float],
) -> OnlineViews:
    """Nothing encoded now: each epoch encodes a fresh augmentation of every training image."""
    return OnlineViews(
        backbone,
        [str(dataset.path(e)) for e in entries],
        [e.impath for e in entries],
        seed,
        setup.batch_size,
        setup.workers,
        scale,
        max_pixels=setup.max_image_pixels,
    )


def _view_bank(
    backbone: Backbone,
    dataset: DatasetSplits,
    entries: list[Entry],
    views: int,
    setup: Setup,
    cache: FeatureCache,
    seed: int,
    scale: tuple[float, float],
) -> tuple[ViewBank, torch.Tensor, list[str]]:
    """(the bank of ``views`` cached views (V, N, D), or the test transform's for 0; labels (N,); skipped paths)."""
    view_ids: list[int | None] = [None] if views == 0 else list(range(views))
    train_views: list[torch.Tensor] = []
    train_labels: torch.Tensor | None = None
    skipped: list[str] = []
    for v in view_ids:
        desc = "train" if v is None else f"train view {v + 1}/{views}"
        feats, labels, skipped = encode_split(backbone, dataset, entries, setup, cache, view=v, desc=desc, scale=scale)
        if train_labels is not None and not torch.equal(labels, train_labels):
            raise TaskResValueError(
                "the training images decoded differently across views; re-run without "
                "skip_bad_images to see which image fails.",
                param="skip_bad_images",
            )
        train_views.append(feats)
        train_labels = labels
    assert train_labels is not None  # view_ids is never empty
    if skipped:
        _check_every_class_left(dataset, train_labels, skipped)
    return ViewBank(torch.stack(train_views), seed), train_labels, skipped


def _check_every_class_left(dataset: DatasetSplits, labels: torch.Tensor, skipped: list[str]) -> None:
    left = set(labels.tolist())
    empty = [name for label, name in enumerate(dataset.classnames) if label not in left]
    if empty:
        raise TaskResValueError(
            f"`skip_bad_images` left class(es) {empty[:10]} with no training image (skipped: "
            f"{skipped[:5]}); fix or replace those images.",
            param="skip_bad_images",
        )


def training_features(
    backbone: Backbone,
    dataset: DatasetSplits,
    config: TrainConfig,
    fewshot: dict[str, list[Entry]],
    setup: Setup,
    cache: FeatureCache | None = None,
) -> Features:
    """The features that training with ``config`` reads: its views at its scale, with the splits its method's
    public code selects on under the official protocol, encoded as that code encodes them."""
    official_base = config.official.base if config.official is not None else None
    return encode_features(
        official_image_backbone(backbone, official_base),
        dataset,
        fewshot,
        config.views,
        setup,
        seed=config.seed,
        scale=config.view_scale,
        cache=cache,
        full_val=config.selects_publicly,
    )


def train_encoder_passes(features: Features) -> int:
    """Images run through the image encoder for training: V x N for a bank of V views (whether encoded now or
    read from the cache), every online draw so far for online views."""
    views = features.train_views
    if isinstance(views, OnlineViews):
        return views.encoded
    assert isinstance(views, ViewBank)  # what encode_features gives
    return views.num_views * views.num_samples


def helper_rank(cache: FeatureCache | None) -> bool:
    """Whether this process is a rank other than 0 of a torchrun job encoding through ``cache`` (None: the cache
    that ``Setup.cache`` makes, which joins the job): it encodes its share of a run's features, and rank 0 alone
    trains, evaluates and writes the run (taskres.distributed)."""
    cluster = distributed.current() if cache is None else cache.cluster
    return cluster is not None and cluster.active and not cluster.is_main
