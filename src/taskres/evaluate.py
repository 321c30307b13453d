"""Metrics over logits: top-1 accuracy (100 * correct / total, as the official evaluator; docs/protocol.md#evaluation)
and per-class accuracy keyed by label (class names need not be unique: ImageNet has two "missile" classes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


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
    ``mean_per_class_accuracy`` (the mean over the labels that have test images: all C in a complete test split)."""
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
    return {
        "accuracy": 100.0 * float(correct.float().mean()) if len(labels) else float("nan"),
        "n_test": int(len(labels)),
        "n_correct": int(correct.sum()),
        "mean_per_class_accuracy": sum(scored) / max(len(scored), 1),
        "per_class_accuracy": per_class,
    }


def evaluate(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict:
    """The metrics of ``head`` on (N, D) features with (N,) labels: the one evaluation behind zeroshot, train and
    eval."""
    return accuracy_metrics(predict_logits(head, features), labels, classnames)
