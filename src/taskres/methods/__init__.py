"""Methods are heads over cached features, registered by name. Each maps (N, D) image features to (N, C) logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from taskres.engine import fit
from taskres.errors import TaskResError, suggest
from taskres.methods.base import FitContext
from taskres.methods.taskres import TaskResConfig, TaskResHead


@dataclass(frozen=True)
class MethodSpec:
    """A method: its config dataclass (defaults = the published preset), how it fits, how its head reloads.

    ``fit(ctx, config)`` returns a trained head mapping (N, D) features to (N, C) logits, with ``export()`` giving
    (tensors, metadata) for classifier.safetensors; ``load(tensors, metadata)`` rebuilds it.
    """

    name: str
    summary: str
    config_cls: type
    fit: Callable[[FitContext, object], torch.nn.Module]
    load: Callable[[dict, dict], torch.nn.Module]


def _fit_taskres(ctx: FitContext, config: TaskResConfig) -> TaskResHead:
    head = TaskResHead(ctx.base, ctx.logit_scale, config)
    fit(head, ctx.train_views, ctx.train_labels, ctx.optim, seed=ctx.seed, device=ctx.device, on_epoch=ctx.on_epoch,
        quiet=ctx.quiet)
    ctx.extras["residual_mean_abs"] = float(head.text_feature_residuals.detach().abs().mean())
    return head.cpu()


METHODS: dict[str, MethodSpec] = {
    "taskres": MethodSpec(
        "taskres", "Task Residual: frozen text classifier t plus a learned residual, t + alpha * x (Yu et al. 2023)",
        TaskResConfig, _fit_taskres, TaskResHead.from_export),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise TaskResError(f"unknown method {name!r}; {suggest(name, METHODS)}known: {', '.join(METHODS)}.")
    return METHODS[name]


def list_methods() -> list[str]:
    return list(METHODS)
