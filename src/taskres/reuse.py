"""Re-using a finished run: its head and backbone loaded back and checked, evaluated again (on its own test split or
another dataset's), or asked for the classes of new images.

    load_run_head(run)                 -> (head, class names, class ids)
    load_run_backbone(config, setup)   -> the backbone the run used, checked to be the same weights
    run_encoder(run, config, backbone) -> the encoder the run's head reads (the backbone with CLIP-LoRA's adapters)
    evaluate_run(run, setup, ...)      -> metrics (``taskres eval``)
    predict(run, images, setup, top_k) -> top-k classes per image (``taskres predict``)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from taskres.atomic import write_json
from taskres.backbones import Backbone, BackboneIdentity, load_backbone
from taskres.backbones.engines import check_engine
from taskres.backbones.official import with_official
from taskres.cache import FeatureCache, check_writable_dir
from taskres.config import Setup
from taskres.data.sources import reopen_dataset
from taskres.data.splits import DatasetSource, DatasetSplits
from taskres.devices import parse_device
from taskres.errors import TaskResError, TaskResValueError, invalid
from taskres.evaluate import evaluate, predict_logits
from taskres.features import encode_split, helper_rank
from taskres.methods import METHODS, Head, get_method
from taskres.runs import CLASSIFIER, CONFIG, METRICS, read_classifier, read_run

logger = logging.getLogger(__name__)

__all__ = ["evaluate_run", "load_run_backbone", "load_run_head", "predict", "run_encoder"]


def load_run_backbone(
    config: dict, setup: Setup, precision: str | None = None, official: bool = True, engine: str | None = None
) -> Backbone:
    """Reload the backbone a run used (a Hub model at the commit it used) and check it is the same weights; at the
    run's precision unless ``precision`` is given, its images encoded by ``engine``, else ``setup.engine``, else the
    run's recorded engine, run as the official code runs it where the run was (its recorded ``official`` mode)
    unless ``official`` is False (the plain model, as ``export`` writes it)."""
    recorded = recorded_identity(config)
    precision = precision or recorded.precision
    if engine is None and _adapts(config):
        engine = "eager"  # the run's own encoder is the merged model, run by PyTorch (run_encoder)
    backbone = load_backbone(
        recorded.reload_spec(),
        device=setup.device,
        precision=precision,
        weights_dir=setup.weights_dir,
        engine=engine or setup.engine or _recorded_engine(recorded, setup, precision),
    )
    difference = backbone.identity.difference(recorded)
    if difference is not None:
        raise TaskResValueError(
            f"the backbone {recorded.spec!r} on this machine differs from the one the run used ({difference}).",
            param="backbone",
        )
    return with_official(backbone, recorded.official) if official else backbone


def recorded_identity(config: dict) -> BackboneIdentity:
    """The backbone record of a run's config.json; a damaged one is an error saying so."""
    try:
        return BackboneIdentity.from_json(config["backbone"])
    except (KeyError, TypeError, ValueError) as err:
        raise TaskResValueError(
            f"the run's config.json has a damaged backbone record ({type(err).__name__}: "
            f"{err}); it was edited. Re-run training.",
            param="run",
        ) from None


def _recorded_engine(recorded: BackboneIdentity, setup: Setup, precision: str) -> str:
    """The engine the run recorded where it can run here (device, precision, packages); else eager, with a
    warning: the engine changes the features only in the last bits, and eval and predict must not fail on it."""
    if not recorded.engine:
        return "eager"
    try:
        check_engine(recorded.engine, parse_device(setup.device), precision)
    except TaskResError as err:
        logger.warning(
            "the run encoded its images with engine %s, which cannot run here (%s); using eager", recorded.engine, err
        )
        return "eager"
    return recorded.engine


def _adapts(config: dict) -> bool:
    """Whether the run's method changed the encoder (CLIP-LoRA), so its features come from its own encoder."""
    method = config.get("method")
    return isinstance(method, str) and method in METHODS and METHODS[method].adapt_backbone is not None


def run_encoder(run: Path, config: dict, backbone: Backbone) -> Backbone:
    """The encoder whose features a run's head reads: the run's backbone, or, for a method that changed the encoder
    (``Method.adapt_backbone``: CLIP-LoRA), the backbone rebuilt with the run's changes."""
    method = config.get("method")
    spec = get_method(method) if isinstance(method, str) else None
    return spec.adapt_backbone(run, backbone) if spec is not None and spec.adapt_backbone is not None else backbone


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
    if helper_rank(cache):
        out = None  # under torchrun, rank 0 alone writes
    if out is not None:  # before the evaluation, which may take minutes
        _check_eval_out(Path(out), run)
    head, classnames, class_ids = load_run_head(run)
    if dataset is None:
        dataset = _recorded_dataset(run, config)
    head = _head_for(head, classnames, class_ids, dataset, run, config)
    if backbone is None:
        backbone = load_run_backbone(config, setup)
    else:
        recorded = recorded_identity(config)
        if (difference := backbone.identity.difference(recorded)) is not None:
            raise TaskResValueError(
                f"the backbone given differs from the one run {str(run)!r} used ({difference}).", param="backbone"
            )
        backbone = with_official(backbone, recorded.official)
    backbone = run_encoder(run, config, backbone)
    test, labels, skipped = encode_split(backbone, dataset, dataset.test, setup, cache or setup.cache(), desc="test")
    metrics = evaluate(head, test, labels, dataset.classnames)
    metrics.update(skipped_images=len(skipped), run=str(run), dataset=dataset.name)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / METRICS, metrics)
    return metrics


def _check_eval_out(out: Path, run: Path) -> None:
    """``out`` can take the evaluation's metrics.json: a new or existing folder, not a run folder."""
    if (out / CONFIG).exists():
        raise TaskResValueError(
            f"out {str(out)!r} is a run folder; its metrics.json would be replaced. Write the "
            f"evaluation elsewhere, e.g. {str(Path(run) / 'eval')}.",
            param="out",
        )
    if out.exists() and not out.is_dir():
        raise TaskResValueError(
            f"out {str(out)!r} exists and is not a folder; choose another path for metrics.json.", param="out"
        )
    check_writable_dir(out, "out")


def _recorded_dataset(run: Path, config: dict) -> DatasetSplits:
    """The dataset the run was trained on, reopened from its record, with the same split entries."""
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
    return dataset


def _head_for(
    head: Head, classnames: list[str], class_ids: list[str], dataset: DatasetSplits, run: Path, config: dict
) -> Head:
    """The run's head over ``dataset``'s classes: its own, or the rows of an ImageNet variant's (by WordNet id)."""
    if class_ids and dataset.class_ids and list(dataset.class_ids) != class_ids:
        from taskres.data.benchmarks import map_class_rows

        # Domain generalisation: keep the rows of the target's classes, matched by WordNet id
        # (docs/protocol.md#evaluation).
        return head.select_classes(
            map_class_rows(class_ids, dataset.class_ids, config["dataset"]["name"], dataset.name)
        )
    if list(dataset.classnames) != list(classnames):
        raise TaskResValueError(
            f"dataset {dataset.name!r} has classes {list(dataset.classnames)[:5]}... but run "
            f"{str(run)!r} was trained on {classnames[:5]}...; evaluate on a dataset with the "
            "same classes in the same order (or an ImageNet variant for an ImageNet run).",
            param="dataset",
        )
    return head


def predict(
    run: str | Path,
    images: Sequence[str | Path],
    setup: Setup,
    top_k: int = 5,
    bad_images: Literal["raise", "report"] = "raise",
) -> list[dict]:
    """Top-k classes with probabilities for each image: ``[{"image", "top": [{"class", "prob"}, ...]}, ...]``.

    An image that cannot be read raises; with ``bad_images="report"`` its entry is ``{"image", "error", "top": []}``
    (``error`` says why) and the other images are predicted all the same."""
    from taskres.image_errors import decode_errors, unreadable_files

    run, config = read_run(run)
    if top_k < 1:
        raise invalid("top_k", "be >= 1", top_k)
    if bad_images not in ("raise", "report"):
        raise invalid("bad_images", "be 'raise' or 'report'", bad_images)
    head, classnames, _ = load_run_head(run)
    backbone = run_encoder(run, config, load_run_backbone(config, setup))
    paths = [str(p) for p in images]
    errors = unreadable_files(paths) if bad_images == "report" else {}
    readable = [p for p in paths if p not in errors]
    found = _top_classes(head, classnames, run, backbone, readable, setup, top_k, skip_bad=bad_images == "report")
    errors.update(decode_errors(sorted(set(readable) - set(found)), setup.max_image_pixels))
    return [
        {"image": p, "error": errors[p], "top": []} if p in errors else {"image": p, "top": found[p]} for p in paths
    ]


def _top_classes(
    head: Head,
    classnames: Sequence[str],
    run: Path,
    backbone: Backbone,
    paths: list[str],
    setup: Setup,
    top_k: int,
    skip_bad: bool,
) -> dict[str, list[dict]]:
    """path -> its top-k ``{"class", "prob"}``, for the images that could be decoded (all of them, or an error,
    unless ``skip_bad``)."""
    if not paths:
        return {}
    cache = FeatureCache(None, batch_size=setup.batch_size, quiet=True, max_pixels=setup.max_image_pixels)
    feats, skipped = cache.features(backbone, paths, skip_bad=skip_bad)
    probs = predict_logits(head, feats).softmax(dim=1)  # (N, C)
    if probs.shape[1] != len(classnames):
        raise TaskResValueError(
            f"run {str(run)!r}: the classifier has {probs.shape[1]} classes but its metadata "
            f"names {len(classnames)}; the file was edited or damaged. Re-run training.",
            param="run",
        )
    top = probs.topk(min(top_k, probs.shape[1]), dim=1)
    bad = set(skipped)
    return {
        p: [{"class": classnames[j], "prob": float(v)} for v, j in zip(values, indices)]
        for p, values, indices in zip(paths, top.values.tolist(), top.indices.tolist())
        if p not in bad
    }
