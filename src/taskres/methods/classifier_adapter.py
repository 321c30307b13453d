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

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

from taskres.errors import check_choice, invalid
from taskres.methods import taskres as taskres_method
from taskres.methods.base import CosineHead, FitContext, Fitted, option
from taskres.methods.registry import Method, register_method


@dataclass(frozen=True)
class ClassifierAdapterConfig:
    form: Literal["residual", "direct"] = field(default="residual", metadata=option(
        "--adapter-form", "t + alpha * phi(t) (residual, the default) or phi(t) (direct)"))
    alpha: float = field(default=0.5, metadata=option(
        "--alpha", "residual scale alpha (default 0.5; 1.0 for Flowers102)"))
    reduction: int = 4  # hidden width D / reduction

    def __post_init__(self) -> None:
        check_choice("form", self.form, ("residual", "direct"))
        if not self.alpha > 0:
            raise invalid("alpha", "be > 0 (the residual scale)", self.alpha)
        if self.reduction < 1:
            raise invalid("reduction", "be >= 1", self.reduction)


class ClassifierAdapterHead(CosineHead):
    def __init__(self, base_text_features: torch.Tensor, logit_scale: float,
                 config: ClassifierAdapterConfig = ClassifierAdapterConfig()):
        super().__init__(base_text_features, logit_scale)
        self.config = config
        dim = base_text_features.shape[1]
        self.adapter = nn.Sequential(nn.Linear(dim, dim // config.reduction, bias=False), nn.ReLU(),
                                     nn.Linear(dim // config.reduction, dim, bias=False), nn.ReLU())

    def classifier(self) -> torch.Tensor:
        t = self.base_text_features  # (C, D)
        phi = self.adapter(t)  # (C, D)
        return t + self.config.alpha * phi if self.config.form == "residual" else phi

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"base_text_features": self.base_text_features,
                **{f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}}

    def metadata(self) -> dict:
        return {**asdict(self.config), "logit_scale": float(self.logit_scale)}

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "ClassifierAdapterHead":
        config = ClassifierAdapterConfig(form=meta["form"], alpha=float(meta["alpha"]),
                                         reduction=int(meta["reduction"]))
        head = cls(tensors["base_text_features"], float(meta["logit_scale"]), config)
        head.adapter.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
        return head


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


register_method(Method(
    "classifier-adapter", "Adapter on the text classifier, t + alpha * phi(t) or phi(t) (TaskRes paper, Table 2)",
    ClassifierAdapterConfig, ClassifierAdapterHead, fit_classifier_adapter, optim_preset=taskres_method.optim_preset,
    config_preset=config_preset))
