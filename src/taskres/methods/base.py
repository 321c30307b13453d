"""What every method receives: cached features, the base classifier, and the run's settings (DESIGN: a method sees
features and the base classifier, never images or files; one that needs the text encoder gets the backbone)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from taskres.backbones import Backbone
from taskres.engine import OptimConfig


@dataclass
class FitContext:
    base: torch.Tensor  # (C, D) base classifier: mean un-normalised text embedding over templates
    logit_scale: float  # tau = exp(logit_scale) of the backbone
    train_views: torch.Tensor  # (V, N, D) cached features of the few-shot images, one slice per view (V = 1, the
    # test transform, with --views 0)
    train_labels: torch.Tensor  # (N,)
    val_features: torch.Tensor | None  # (M, D) few-shot validation features (test transform), or None
    val_labels: torch.Tensor | None  # (M,)
    optim: OptimConfig | None  # None for training-free methods
    seed: int
    shots: int
    classnames: Sequence[str]
    templates: Sequence[str]
    dataset: str = ""
    backbone: Backbone | None = None  # for methods with the text encoder in the loop
    device: str = "cpu"
    quiet: bool = False
    on_epoch: Callable[[dict], None] | None = None
    extras: dict = field(default_factory=dict)  # what a method reports into metrics.json
