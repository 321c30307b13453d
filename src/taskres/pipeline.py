"""The workflow: dataset -> few-shot entries -> cached features -> base classifier -> head -> metrics -> run folder.

Each function here wires the library's pieces; the CLI only parses arguments and calls these.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

import taskres
from taskres.backbones import Backbone, load_backbone
from taskres.cache import FeatureCache
from taskres.data.sampling import sample_fewshot
from taskres.data.splits import DatasetSplits, Entry, load_image_folder, load_split_file
from taskres.engine import OptimConfig
from taskres.errors import TaskResError
from taskres.evaluate import accuracy_metrics, predict_logits
from taskres.methods import get_method
from taskres.methods.base import FitContext
from taskres.methods.enhanced_base import PROJECTION_FILE, EnhancedBaseConfig, enhanced_base, save_projection
from taskres.methods.taskres import TaskResHead
from taskres.runs import (CLASSIFIER, CONFIG, LOG, METRICS, SPLIT, EpochLog, load_classifier, prepare_run_dir,
                          read_run, save_classifier, write_json)
from taskres.text import build_base_classifier, check_templates

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """How features are computed: device, precision, cache, encoder batch size, progress bars, bad images."""

    device: str = "cpu"
    precision: str = "fp32"
    cache_dir: str | None = None
    batch_size: int = 32
    workers: int = 0
    quiet: bool = False
    skip_bad_images: bool = False
    weights_dir: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise TaskResError(f"--encode-batch-size must be >= 1; got {self.batch_size}.")
        if self.workers < 0:
            raise TaskResError(f"--workers must be >= 0 (0 = load images in the main process); got {self.workers}.")
        from taskres.backbones import parse_device

        parse_device(self.device)

    def cache(self) -> FeatureCache:
        return FeatureCache(self.cache_dir, batch_size=self.batch_size, workers=self.workers, quiet=self.quiet)


def open_dataset(data: str | Path | None = None, split_file: str | Path | None = None,
                 templates: Sequence[str] | None = None, dataset: str | None = None,
                 root: str | Path | None = None) -> DatasetSplits:
    """A named benchmark (``dataset`` under ``root``), a CoOp split-file dataset (``data`` + ``split_file``) or an
    ImageFolder (``data/train``, ``data/test``). ``templates`` replace the dataset's default templates."""
    if dataset is not None:
        if data is not None or split_file is not None:
            raise TaskResError("pass either --dataset NAME --root ROOT or --data DIR [--split-file FILE], not both.")
        if root is None:
            raise TaskResError(f"--dataset {dataset} needs --root, the folder that holds CoOp's dataset folders.")
        from taskres.data.benchmarks import load_benchmark

        ds = load_benchmark(dataset, root)
        return replace(ds, templates=check_templates(templates)) if templates else ds
    if data is None:
        raise TaskResError("no dataset given: pass --data DIR (with --split-file FILE for CoOp-format data), "
                           "or --dataset NAME --root ROOT for a benchmark.")
    if split_file is not None:
        from taskres.data.benchmarks import BENCHMARKS, benchmark_for_split_file

        # CoOp's own split file: the benchmark's name (its presets) and, unless given, its templates (SPEC).
        known = benchmark_for_split_file(split_file)
        if known is not None:
            logger.info("%s is CoOp's split file of %s: using its presets and default templates", split_file, known)
        default = BENCHMARKS[known].templates if known is not None else ("a photo of a {}.",)
        return load_split_file(split_file, data, check_templates(templates) if templates else default,
                               name=known or "")
    return load_image_folder(data, check_templates(templates) if templates else ("a photo of a {}.",))


def reopen_dataset(source: dict) -> DatasetSplits:
    """The dataset a run recorded in its config."""
    kind = source.get("kind")
    if kind == "benchmark":
        return open_dataset(dataset=source["dataset"], root=source["root"], templates=source["templates"])
    if kind in ("split_file", "image_folder"):
        return open_dataset(source["data"], source.get("split_file"), source["templates"])
    raise TaskResError(f"the run's dataset {source.get('name')!r} cannot be found again; pass --dataset/--root or "
                       "--data/--split-file to say where it is.")


def encode_split(backbone: Backbone, dataset: DatasetSplits, entries: Sequence[Entry], setup: Setup,
                 cache: FeatureCache, view: int | None = None, desc: str = "encoding"):
    """Features (N, D), labels (N,), skipped paths for entries; undecodable images are dropped when skipping."""
    paths = [str(dataset.path(e)) for e in entries]
    feats, skipped = cache.features(backbone, paths, view=view, skip_bad=setup.skip_bad_images, desc=desc)
    labels = torch.tensor([e.label for e in entries], dtype=torch.long)
    if skipped:
        keep = torch.tensor([p not in set(skipped) for p in paths])
        feats, labels = feats[keep], labels[keep]
    return feats, labels, skipped


@dataclass(frozen=True)
class TrainConfig:
    """A training run of one method. ``TrainConfig.preset(method, shots, seed, dataset)`` gives the method's
    published settings; the plain defaults are TaskRes's.

    ``method_config`` None means the method's default config; ``optim`` is None for training-free methods (it is
    set so); ``base`` (TaskRes only) builds the enhanced base of TaskRes*.
    """

    shots: int
    seed: int
    method: str = "taskres"
    method_config: Any = None  # the method's config dataclass
    optim: OptimConfig | None = field(default_factory=OptimConfig)
    views: int = 10
    base: EnhancedBaseConfig | None = None

    @classmethod
    def preset(cls, method: str, shots: int, seed: int, dataset: str = "", **overrides) -> "TrainConfig":
        """The method's published settings for ``dataset`` (a benchmark name, or "" for others)."""
        spec = get_method(method)
        optim = spec.optim_preset(shots, dataset) if spec.optim_preset is not None else None
        values = dict(method_config=spec.default_config(dataset), optim=optim, views=spec.views)
        return cls(shots=shots, seed=seed, method=method, **{**values, **overrides})

    def __post_init__(self) -> None:
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1:
            raise TaskResError(f"--shots must be an integer >= 1 (images per class); got {self.shots!r}.")
        if not isinstance(self.seed, int):
            raise TaskResError(f"--seed must be an integer; got {self.seed!r}.")
        if self.views < 0:
            raise TaskResError(f"--views must be >= 0 (0 = no augmentation); got {self.views!r}.")
        spec = get_method(self.method)
        if self.method_config is None:
            object.__setattr__(self, "method_config", spec.default_config())
        if not isinstance(self.method_config, spec.config_cls):
            raise TaskResError(f"method {self.method!r} takes a {spec.config_cls.__name__}, got "
                               f"{type(self.method_config).__name__}.")
        if spec.optim_preset is None:
            object.__setattr__(self, "optim", None)  # training-free: nothing is optimised
        elif not isinstance(self.optim, OptimConfig):
            raise TaskResError(f"method {self.method!r} is trained and needs an OptimConfig; got {self.optim!r}.")
        if spec.test_view_only and self.views != 0:
            raise TaskResError(f"method {self.method!r} trains on the test-transform features of the few-shot images "
                               f"(no augmentation); pass --views 0 (its default); got --views {self.views}.")
        if self.base is not None and self.method != "taskres":
            raise TaskResError(f"--base-weights and --enhance-base build TaskRes*'s enhanced base and apply to "
                               f"--method taskres only; got --method {self.method}.")


def _run_config(kind: str, backbone: Backbone, dataset: DatasetSplits, setup: Setup, **extra) -> dict:
    return {
        "kind": kind, "taskres_version": taskres.__version__, "torch_version": torch.__version__,
        "backbone": backbone.identity,
        "dataset": {"name": dataset.name, **dataset.source, "num_classes": dataset.num_classes,
                    "templates": list(dataset.templates), "split_hash": dataset.split_hash},
        "setup": {"device": setup.device, "precision": setup.precision, "skip_bad_images": setup.skip_bad_images},
        **extra,
    }


def zeroshot(backbone: Backbone, dataset: DatasetSplits, setup: Setup, out: str | Path | None = None,
             overwrite: bool = False) -> dict:
    """Zero-shot accuracy of the base classifier on the test split; writes a run folder when ``out`` is given."""
    run = prepare_run_dir(out, overwrite) if out is not None else None
    base = build_base_classifier(backbone, dataset.classnames, dataset.templates)
    head = TaskResHead(base, backbone.logit_scale)
    feats, labels, skipped = encode_split(backbone, dataset, dataset.test, setup, setup.cache(), desc="test")
    metrics = accuracy_metrics(predict_logits(head, feats), labels, dataset.classnames)
    metrics.update(zero_shot_accuracy=metrics["accuracy"], skipped_images=len(skipped))
    if run is not None:
        write_json(run / CONFIG, _run_config("zeroshot", backbone, dataset, setup, method="zero-shot"))
        save_classifier(run / CLASSIFIER, "taskres", head, list(dataset.classnames), list(dataset.class_ids))
        write_json(run / METRICS, metrics)
    return metrics


def train(backbone: Backbone, dataset: DatasetSplits, config: TrainConfig, setup: Setup,
          out: str | Path | None = None, overwrite: bool = False) -> tuple[torch.nn.Module, dict]:
    """Sample K shots for the seed, train the head on cached features, evaluate on test; return (head, metrics)."""
    if not dataset.train:
        raise TaskResError(f"dataset {dataset.name!r} has no training split (it is an evaluation-only set); train "
                           f"on imagenet and evaluate the run with `taskres eval --run RUN --dataset {dataset.name}`.")
    run = prepare_run_dir(out, overwrite) if out is not None else None
    t0 = time.perf_counter()
    fewshot = sample_fewshot(dataset, config.shots, config.seed)
    if run is not None:
        write_json(run / SPLIT, {k: [e.to_json() for e in v] for k, v in fewshot.items()})
    cache = setup.cache()
    view_ids: list[int | None] = [None] if config.views == 0 else list(range(config.views))
    views = []
    for v in view_ids:
        feats, labels, _ = encode_split(backbone, dataset, fewshot["train"], setup, cache, view=v,
                                        desc="train" if v is None else f"train view {v + 1}/{config.views}")
        views.append(feats)
    train_views = torch.stack(views)  # (V, N, D)
    test_feats, test_labels, skipped = encode_split(backbone, dataset, dataset.test, setup, cache, desc="test")
    val_feats, val_labels, _ = encode_split(backbone, dataset, fewshot["val"], setup, cache, desc="val") \
        if fewshot["val"] else (None, None, [])
    t_features = time.perf_counter() - t0

    base = build_base_classifier(backbone, dataset.classnames, dataset.templates)
    zs_head = TaskResHead(base, backbone.logit_scale)
    zs_metrics = accuracy_metrics(predict_logits(zs_head, test_feats), test_labels, dataset.classnames)
    base_info: dict = {}
    if config.base is not None:  # TaskRes*: the base rebuilt with a loaded or tuned text projection
        base, projection, base_info = enhanced_base(backbone, dataset.classnames, dataset.templates, config.base,
                                                    train_views, labels, val_feats, val_labels, config.seed,
                                                    setup.device, setup.quiet)
        base_info["enhanced_base_accuracy"] = accuracy_metrics(
            predict_logits(TaskResHead(base, backbone.logit_scale), test_feats), test_labels,
            dataset.classnames)["accuracy"]
        if run is not None and config.base.tune:
            save_projection(run / PROJECTION_FILE, projection, {"backbone": json.dumps(backbone.identity),
                                                                "dataset": dataset.name, "shots": str(config.shots),
                                                                "seed": str(config.seed)})
            base_info["text_projection_file"] = str(run / PROJECTION_FILE)

    spec = get_method(config.method)
    log = EpochLog(run / LOG) if run is not None else None
    ctx = FitContext(base=base, logit_scale=backbone.logit_scale, train_views=train_views, train_labels=labels,
                     val_features=val_feats, val_labels=val_labels, optim=config.optim, seed=config.seed,
                     shots=config.shots, classnames=dataset.classnames, templates=dataset.templates,
                     dataset=dataset.name, backbone=backbone, device=setup.device, quiet=setup.quiet, on_epoch=log)
    t1 = time.perf_counter()
    try:
        head = spec.fit(ctx, config.method_config).cpu()
    finally:
        if log is not None:
            log.close()
    t_train = time.perf_counter() - t1
    metrics = accuracy_metrics(predict_logits(head, test_feats), test_labels, dataset.classnames)
    metrics.update(zero_shot_accuracy=zs_metrics["accuracy"], skipped_images=len(skipped),
                   n_train=int(len(labels)), seconds_features=round(t_features, 3), seconds_train=round(t_train, 3))
    if val_feats is not None and len(val_feats):
        metrics["val_accuracy"] = accuracy_metrics(predict_logits(head, val_feats), val_labels,
                                                   dataset.classnames)["accuracy"]
    metrics.update(base_info)
    metrics.update(ctx.extras)
    if run is not None:
        write_json(run / CONFIG, _run_config(
            "train", backbone, dataset, setup, method=config.method, shots=config.shots, seed=config.seed,
            views=config.views, method_config=asdict(config.method_config),
            optim=asdict(config.optim) if config.optim is not None else None,
            base=asdict(config.base) if config.base is not None else None))
        save_classifier(run / CLASSIFIER, config.method, head, list(dataset.classnames), list(dataset.class_ids))
        write_json(run / METRICS, metrics)
    return head, metrics


def load_run_backbone(config: dict, setup: Setup) -> Backbone:
    """Reload the backbone a run used and check it is the same weights."""
    recorded = config["backbone"]
    backbone = load_backbone(recorded["spec"], device=setup.device, precision=recorded["precision"],
                             weights_dir=setup.weights_dir)
    for key in ("sha256", "tag", "arch"):
        if recorded.get(key) != backbone.identity.get(key):
            raise TaskResError(f"the backbone {recorded['spec']!r} on this machine differs from the one the run used "
                               f"({key}: {backbone.identity.get(key)!r} here, {recorded.get(key)!r} in the run).")
    return backbone


def evaluate_run(run: str | Path, setup: Setup, dataset: DatasetSplits | None = None,
                 out: str | Path | None = None) -> dict:
    """Re-evaluate a run's classifier on its own test split, or on ``dataset``'s."""
    run, config = read_run(run)
    if out is not None and (Path(out) / CONFIG).exists():
        raise TaskResError(f"--out {str(out)!r} is a run folder; its metrics.json would be replaced. Write the "
                           f"evaluation elsewhere, e.g. --out {str(Path(run) / 'eval')}.")
    head, classnames, class_ids = load_classifier(run / CLASSIFIER)
    if dataset is None:
        dataset = reopen_dataset(config["dataset"])
        if dataset.split_hash != config["dataset"]["split_hash"]:
            raise TaskResError(f"the dataset of run {str(run)!r} has changed since it was trained (its split "
                               "entries differ from the ones recorded); pass --data/--split-file or --dataset/--root "
                               "to evaluate on the dataset as it is now, knowingly.")
    if class_ids and dataset.class_ids and list(dataset.class_ids) != class_ids:
        from taskres.data.benchmarks import map_class_rows

        # Domain generalisation: keep the rows of the target's classes, matched by WordNet id (SPEC).
        head = head.select_classes(map_class_rows(class_ids, dataset.class_ids, config["dataset"]["name"],
                                                  dataset.name))
    elif list(dataset.classnames) != list(classnames):
        raise TaskResError(f"dataset {dataset.name!r} has classes {list(dataset.classnames)[:5]}... but run "
                           f"{str(run)!r} was trained on {classnames[:5]}...; evaluate on a dataset with the same "
                           "classes in the same order (or an ImageNet variant for an ImageNet run).")
    backbone = load_run_backbone(config, setup)
    feats, labels, skipped = encode_split(backbone, dataset, dataset.test, setup, setup.cache(), desc="test")
    metrics = accuracy_metrics(predict_logits(head, feats), labels, dataset.classnames)
    metrics.update(skipped_images=len(skipped), run=str(run), dataset=dataset.name)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / METRICS, metrics)
    return metrics


def predict(run: str | Path, images: Sequence[str | Path], setup: Setup, top_k: int = 5) -> list[dict]:
    """Top-k classes with probabilities for each image: ``[{"image", "top": [{"class", "prob"}, ...]}, ...]``."""
    run, config = read_run(run)
    if top_k < 1:
        raise TaskResError(f"--top-k must be >= 1; got {top_k!r}.")
    head, classnames, _ = load_classifier(run / CLASSIFIER)
    backbone = load_run_backbone(config, setup)
    feats, _ = FeatureCache(None, batch_size=setup.batch_size, quiet=True).features(backbone, images)
    probs = predict_logits(head, feats).softmax(dim=1)  # (N, C)
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [{"image": str(img), "top": [{"class": classnames[j], "prob": float(p)}
                                        for p, j in zip(top.values[i].tolist(), top.indices[i].tolist())]}
            for i, img in enumerate(images)]
