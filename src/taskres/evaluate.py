"""Metrics over logits: top-1 accuracy (100 * correct / total, as the official evaluator; docs/protocol.md#evaluation)
and per-class accuracy keyed by label (class names need not be unique: ImageNet has two "missile" classes), and the
most frequent confusions (what the report's per-dataset drill-down shows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

CONFUSIONS_KEPT = 200  # all of them for a dataset of up to 15 classes; the top ones of a large one


@torch.no_grad()
def predict_logits(head: torch.nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(N, D) -> (N, C) logits on the CPU, in batches."""
    head.eval()
    device = next(iter(head.buffers())).device
    out = [head(features[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict:
    """``accuracy`` (top-1 %), ``n_test``, ``n_correct``, ``per_class_accuracy`` (a list in label order of
    ``{"label", "class", "accuracy", "n"}``; accuracy None for a label without test images) and
    ``mean_per_class_accuracy`` (the mean over the labels that have test images: all C in a complete test split),
    ``confusions`` (``[true label, predicted label, count]`` of the misclassified pairs, most frequent first, at most
    CONFUSIONS_KEPT) and ``confusions_complete`` (whether that list holds every misclassified pair)."""
    pred = logits.argmax(dim=1)  # (N,)
    correct = pred == labels
    per_class: list[dict[str, Any]] = []
    for c, name in enumerate(classnames):
        mask = labels == c
        n = int(mask.sum())
        per_class.append(
            {"label": c, "class": name, "n": n, "accuracy": 100.0 * float(correct[mask].float().mean()) if n else None}
        )
    scored = [p["accuracy"] for p in per_class if p["accuracy"] is not None]
    confusions = top_confusions(labels[~correct], pred[~correct], len(classnames))
    return {
        "accuracy": 100.0 * float(correct.float().mean()) if len(labels) else float("nan"),
        "n_test": int(len(labels)),
        "n_correct": int(correct.sum()),
        "mean_per_class_accuracy": sum(scored) / max(len(scored), 1),
        "per_class_accuracy": per_class,
        "confusions": confusions[:CONFUSIONS_KEPT],
        "confusions_complete": len(confusions) <= CONFUSIONS_KEPT,
    }


def top_confusions(labels: torch.Tensor, pred: torch.Tensor, num_classes: int) -> list[list[int]]:
    """``[true, predicted, count]`` of every (true, predicted) pair among (M,) misclassified labels and predictions,
    by count (descending), then true and predicted label."""
    counts = torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes) if len(labels) else None
    if counts is None:
        return []
    pairs = torch.nonzero(counts).flatten().tolist()
    out = [[p // num_classes, p % num_classes, int(counts[p])] for p in pairs]
    return sorted(out, key=lambda t: (-t[2], t[0], t[1]))


def evaluate(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict:
    """The metrics of ``head`` on (N, D) features with (N,) labels: the one evaluation behind zeroshot, train and
    eval."""
    return accuracy_metrics(predict_logits(head, features), labels, classnames)
