"""Metrics over logits: top-1 accuracy (100 * correct / total, as the official evaluator) and per-class accuracy."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def predict_logits(head: torch.nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """(N, D) -> (N, C) logits on the CPU, in batches."""
    head.eval()
    device = next(iter(head.buffers())).device
    out = [head(features[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict:
    """``accuracy`` (top-1 %), ``n_test``, ``per_class_accuracy`` {class: %}, ``mean_per_class_accuracy``."""
    pred = logits.argmax(dim=1)
    correct = pred == labels
    per_class = {}
    for c, name in enumerate(classnames):
        mask = labels == c
        if mask.any():
            per_class[name] = 100.0 * float(correct[mask].float().mean())
    return {
        "accuracy": 100.0 * float(correct.float().mean()) if len(labels) else float("nan"),
        "n_test": int(len(labels)),
        "n_correct": int(correct.sum()),
        "mean_per_class_accuracy": sum(per_class.values()) / max(len(per_class), 1),
        "per_class_accuracy": per_class,
    }
