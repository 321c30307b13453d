"""Methods are heads over cached features, registered by name. Each maps (N, D) image features to (N, C) logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from taskres.errors import TaskResError, suggest
from taskres.methods.taskres import TaskResConfig, TaskResHead


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    config_cls: type
    build: Callable[[torch.Tensor, float, object], torch.nn.Module]  # (base (C, D), logit scale, config) -> head
    load: Callable[[dict, dict], torch.nn.Module]  # (tensors, metadata) -> head


METHODS: dict[str, MethodSpec] = {
    "taskres": MethodSpec(
        "taskres", "Task Residual: frozen text classifier t plus a learned residual, t + alpha * x (Yu et al. 2023)",
        TaskResConfig, TaskResHead, TaskResHead.from_export),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise TaskResError(f"unknown method {name!r}; {suggest(name, METHODS)}known: {', '.join(METHODS)}.")
    return METHODS[name]


def list_methods() -> list[str]:
    return list(METHODS)
