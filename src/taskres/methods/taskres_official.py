"""A residual trained by the official TaskRes code, imported as a TaskRes head (docs/protocol.md#official-checkpoints).

    import_official(checkpoint, backbone, dataset, setup) -> (TaskResHead, metrics on the test split)

The official trainer (Dassl) saves ``prompt_learner/model.pth.tar-<epoch>``: a state_dict with the base t
(``base_text_features``, (C, D)) and the residual x (``text_feature_residuals``, (C, D)), read safely. alpha is not in
the file: the paper's, 0.5 (1.0 on Flowers102), unless given. The test images are encoded as that trainer encodes
them (``taskres.backbones.official.trainer_backbone``), and compared with the base ``--protocol official`` builds.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from taskres.backbones import Backbone
from taskres.backbones.official import trainer_backbone
from taskres.data.splits import DatasetSplits
from taskres.errors import TaskResValueError
from taskres.evaluate import evaluate
from taskres.features import encode_split
from taskres.methods.registry import get_method, method_files
from taskres.methods.taskres import TaskResConfig, TaskResHead, config_preset
from taskres.run_writer import open_run
from taskres.runs import run_record
from taskres.safe_load import load_checkpoint

if TYPE_CHECKING:
    from taskres.config import Setup

NAMES = ("base_text_features", "text_feature_residuals")


def import_official(
    checkpoint: str | Path,
    backbone: Backbone,
    dataset: DatasetSplits,
    setup: Setup,
    alpha: float | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[TaskResHead, dict]:
    """A residual trained by the official code, as a TaskRes head evaluated on ``dataset``'s test split; a run
    folder for ``eval`` and ``predict`` when ``out`` is given. ``alpha`` defaults to the paper's for the dataset."""
    checkpoint = Path(checkpoint)
    backbone = trainer_backbone(backbone)  # recorded in the run, so eval and predict encode as it did
    ckpt = load_checkpoint(checkpoint, "official checkpoint")
    base, residual = read_official(ckpt, checkpoint, backbone, dataset)
    config = TaskResConfig(alpha=alpha) if alpha is not None else config_preset(dataset.name)
    with open_run(out, overwrite, method_files()) as writer:
        head = TaskResHead(base, backbone.logit_scale, config)
        with torch.no_grad():
            head.text_feature_residuals.copy_(residual)
        metrics = evaluate_official(head, base, backbone, dataset, setup)
        metrics["checkpoint_epoch"] = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
        if writer is not None:
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


def read_official(
    ckpt: Any, checkpoint: Path, backbone: Backbone, dataset: DatasetSplits
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, x), both (C, D) float32, from a loaded official checkpoint, checked against the dataset and backbone."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor) for k in NAMES):
        raise TaskResValueError(
            f"official checkpoint {str(checkpoint)!r} has no state_dict with base_text_features "
            "and text_feature_residuals; pass a prompt_learner/model.pth.tar-<epoch> written by "
            "the official TaskRes trainer.",
            param="checkpoint",
        )
    base, residual = (state[k].float() for k in NAMES)
    want = (dataset.num_classes, backbone.embed_dim)
    for name, t in zip(NAMES, (base, residual)):
        if tuple(t.shape) != want:
            raise TaskResValueError(
                f"official checkpoint {str(checkpoint)!r}: {name} is {tuple(t.shape)}, but "
                f"dataset {dataset.name!r} with backbone {backbone.identity.spec!r} needs {want} "
                "(classes x embedding dim); use the checkpoint of this dataset and backbone.",
                param="checkpoint",
            )
    return base, residual


def evaluate_official(
    head: TaskResHead, base: torch.Tensor, backbone: Backbone, dataset: DatasetSplits, setup: Setup
) -> dict:
    """The imported head's test metrics, beside the head at initialisation (zero-shot CLIP) on our base (TaskRes's
    under ``--protocol official``: the fp16 text encoder) and on the file's base t."""
    from taskres.workflow import base_classifier  # here: taskres.workflow imports the method registry

    test, labels, skipped = encode_split(backbone, dataset, dataset.test, setup, setup.cache(), desc="test")
    ours = base_classifier(backbone, dataset, get_method("taskres").official)

    def accuracy(classifier: torch.Tensor) -> float:
        return evaluate(TaskResHead(classifier, backbone.logit_scale), test, labels, dataset.classnames)["accuracy"]

    metrics = evaluate(head, test, labels, dataset.classnames)
    metrics.update(
        zero_shot_accuracy=accuracy(ours),
        imported_base_accuracy=accuracy(base),
        # How far the file's base is from ours: a check of the setup (backbone, class names, templates).
        base_relative_difference=float((base - ours).norm() / ours.norm()),
        residual_mean_abs=head.residual_mean_abs(),
        skipped_images=len(skipped),
    )
    return metrics
