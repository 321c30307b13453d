"""taskres: Task Residual tuning of CLIP-style vision-language models on cached features.

The public API (imported lazily, so ``import taskres`` stays cheap):

    load_backbone, Backbone                       backbones (OpenAI names/files, open_clip pairs, shipped models)
    open_dataset, sample_fewshot, DatasetSplits   data (CoOp split files, ImageFolders, benchmarks)
    FeatureCache                                  encode images once, verified on disk
    build_base_classifier                         class names x templates -> (C, D)
    TaskResHead, TaskResConfig                    the method
    OptimConfig, fit                              the training loop
    accuracy_metrics, predict_logits              evaluation
    train, zeroshot, evaluate_run, predict        the whole workflow, as the CLI runs it
    encode_features, fit_method, evaluate         its steps, one at a time
    get_method, register_method, Method           the method registry
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_backbone": "taskres.backbones",
    "Backbone": "taskres.backbones",
    "open_dataset": "taskres.data.sources",
    "sample_fewshot": "taskres.data.sampling",
    "DatasetSplits": "taskres.data.splits",
    "Entry": "taskres.data.splits",
    "FeatureCache": "taskres.cache",
    "build_base_classifier": "taskres.text",
    "TaskResHead": "taskres.methods.taskres",
    "TaskResConfig": "taskres.methods.taskres",
    "OptimConfig": "taskres.engine",
    "fit": "taskres.engine",
    "accuracy_metrics": "taskres.evaluate",
    "predict_logits": "taskres.evaluate",
    "train": "taskres.workflow",
    "zeroshot": "taskres.workflow",
    "evaluate_run": "taskres.reuse",
    "predict": "taskres.reuse",
    "Setup": "taskres.config",
    "TrainConfig": "taskres.config",
    "TaskResError": "taskres.errors",
    # added with the method registry and the typed workflow steps
    "Features": "taskres.features",
    "encode_features": "taskres.features",
    "fit_method": "taskres.workflow",
    "evaluate": "taskres.evaluate",
    "get_method": "taskres.methods",
    "register_method": "taskres.methods",
    "Method": "taskres.methods",
    "BackboneIdentity": "taskres.backbones",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'taskres' has no attribute {name!r}")
