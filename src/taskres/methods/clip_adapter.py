"""CLIP-Adapter (Gao et al., IJCV 2023), visual adapter, as gaopengcuhk/CLIP-Adapter ``clip_adapter.py``:

    f' = r * mlp(f) + (1 - r) * f          f: (N, D) raw image feature;  r: residual ratio, 0.2
    mlp = Linear(D, D/4, no bias) -> ReLU -> Linear(D/4, D, no bias) -> ReLU
    logits = tau * cos(f', t)              t: (C, D) frozen base classifier

With r = 0 the head is zero-shot CLIP. Only the MLP is trained, with CoOp's optimiser (Dassl ``sgd``: momentum 0.9,
weight decay 5e-4, lr 2e-3, batch 32, the warm-up and cosine of TaskRes), 50/100/200 epochs for 1/2-4/8-16 shots, on
the cached augmented views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from taskres.engine import OptimConfig
from taskres.errors import TaskResValueError
from taskres.methods.base import CosineHead, FitContext, Fitted
from taskres.methods.registry import Method, register_method


@dataclass(frozen=True)
class ClipAdapterConfig:
    ratio: float = 0.2  # r
    reduction: int = 4  # hidden width D / reduction

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 1 or self.reduction < 1:
            raise TaskResValueError(
                f"CLIP-Adapter needs 0 <= ratio <= 1 and reduction >= 1; got {self.ratio!r}, {self.reduction!r}.",
                param="ratio",
            )


def coop_schedule_epochs(shots: int) -> int:
    """CoOp's configs for 1 / 2-4 / 8-16 shots: rn50_ep50, rn50_ep100, rn50 (200 epochs)."""
    return 50 if shots == 1 else 100 if shots <= 4 else 200


def optim_preset(shots: int, dataset: str) -> OptimConfig:
    """``taskres train --method clip-adapter``: CoOp's rn50*.yaml optimiser and Dassl's SGD defaults."""
    return OptimConfig(
        lr=2e-3, epochs=coop_schedule_epochs(shots), batch_size=32, weight_decay=5e-4, optimizer="sgd", momentum=0.9
    )


def adapter_mlp(dim: int, reduction: int) -> nn.Sequential:
    """CLIP-Adapter's MLP: Linear(D, D / reduction, no bias) -> ReLU -> Linear(D / reduction, D, no bias) -> ReLU."""
    return nn.Sequential(
        nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(), nn.Linear(dim // reduction, dim, bias=False), nn.ReLU()
    )


class MLPAdapterHead(CosineHead):
    """A cosine head with CLIP-Adapter's MLP (``self.adapter``) and a config dataclass with a ``reduction`` field;
    exported as the base, the MLP's weights (``adapter.*``) and the config. Subclasses say where the MLP acts."""

    def __init__(self, base_text_features: torch.Tensor, logit_scale: float, config):
        super().__init__(base_text_features, logit_scale)
        self.config = config
        self.adapter = adapter_mlp(base_text_features.shape[1], config.reduction)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "base_text_features": self.base_text_features,
            **{f"adapter.{k}": v for k, v in self.adapter.state_dict().items()},
        }


class ClipAdapterHead(MLPAdapterHead):
    config_cls = ClipAdapterConfig

    def __init__(
        self, base_text_features: torch.Tensor, logit_scale: float, config: ClipAdapterConfig = ClipAdapterConfig()
    ):
        super().__init__(base_text_features, logit_scale, config)

    def image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        f = image_features.float()  # (N, D)
        r = self.config.ratio
        return r * self.adapter(f) + (1 - r) * f


def fit_clip_adapter(ctx: FitContext, config: ClipAdapterConfig) -> Fitted:
    with torch.random.fork_rng(devices=[]):  # the MLP's default init, drawn from the run's seed only
        torch.manual_seed(ctx.seed)
        head = ClipAdapterHead(ctx.base, ctx.logit_scale, config)
    ctx.train(head)
    return Fitted(head.cpu())


register_method(
    Method(
        "clip-adapter",
        "CLIP-Adapter: residual MLP on the image feature, r * mlp(f) + (1 - r) * f (Gao et al.)",
        ClipAdapterConfig,
        ClipAdapterHead,
        fit_clip_adapter,
        optim_preset=optim_preset,
    )
)
