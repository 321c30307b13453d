"""Adapter-style tuning of the classifier, the TaskRes paper's Table 2 comparison of ways to tune ``t``:

    phi(t) = ReLU(ReLU(t W1^T) W2^T)        CLIP-Adapter's MLP (D -> D/4 -> D, no bias), on each row of t (C, D)
    residual:  t' = t + alpha * phi(t)       the adapter-style classifier
    direct:    t' = phi(t)                   a direct adapter on the classifier
    logits = tau * cos(z, t')

Unlike TaskRes's residual ``x``, ``phi(t)`` is a function of the old classifier, which is the paper's argument. Only
``phi`` is trained, with TaskRes's optimiser preset (Adam, lr 2e-3 / 2e-4 on ImageNet, batch 256, weight decay
5e-4, 100 / 200 epochs); the MLP starts from PyTorch's default init drawn from the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from taskres.errors import check_choice, invalid
from taskres.methods import taskres as taskres_method
from taskres.methods.base import FitContext, Fitted, option
from taskres.methods.clip_adapter import MLPAdapterHead
from taskres.methods.registry import Method, register_method


@dataclass(frozen=True)
class ClassifierAdapterConfig:
    form: Literal["residual", "direct"] = field(
        default="residual",
        metadata=option("--adapter-form", "t + alpha * phi(t) (residual, the default) or phi(t) (direct)"),
    )
    alpha: float = field(
        default=0.5, metadata=option("--alpha", "residual scale alpha (default 0.5; 1.0 for Flowers102)")
    )
    reduction: int = 4  # hidden width D / reduction

    def __post_init__(self) -> None:
        check_choice("form", self.form, ("residual", "direct"))
        if not self.alpha > 0:
            raise invalid("alpha", "be > 0 (the residual scale)", self.alpha)
        if self.reduction < 1:
            raise invalid("reduction", "be >= 1", self.reduction)


class ClassifierAdapterHead(MLPAdapterHead):
    config_cls = ClassifierAdapterConfig

    def __init__(
        self,
        base_text_features: torch.Tensor,
        logit_scale: float,
        config: ClassifierAdapterConfig = ClassifierAdapterConfig(),
    ):
        super().__init__(base_text_features, logit_scale, config)

    def classifier(self) -> torch.Tensor:
        t = self.base_text_features  # (C, D)
        phi = self.adapter(t)  # (C, D)
        return t + self.config.alpha * phi if self.config.form == "residual" else phi


def config_preset(dataset: str) -> ClassifierAdapterConfig:
    return ClassifierAdapterConfig(alpha=taskres_method.config_preset(dataset).alpha)


def fit_classifier_adapter(ctx: FitContext, config: ClassifierAdapterConfig) -> Fitted:
    with torch.random.fork_rng(devices=[]):  # phi's default init, drawn from the run's seed only
        torch.manual_seed(ctx.seed)
        head = ClassifierAdapterHead(ctx.base, ctx.logit_scale, config)
    ctx.train(head)
    with torch.no_grad():
        change = float((head.classifier() - head.base_text_features).norm() / head.base_text_features.norm())
    return Fitted(head.cpu(), {"classifier_relative_change": change})


register_method(
    Method(
        "classifier-adapter",
        "Adapter on the text classifier, t + alpha * phi(t) or phi(t) (TaskRes paper, Table 2)",
        ClassifierAdapterConfig,
        ClassifierAdapterHead,
        fit_classifier_adapter,
        optim_preset=taskres_method.optim_preset,
        config_preset=config_preset,
    )
)
