"""CLIP-Adapter (Gao et al., IJCV 2023), visual adapter, as gaopengcuhk/CLIP-Adapter ``clip_adapter.py``:

    f' = r * mlp(f) + (1 - r) * f          f: (N, D) raw image feature;  r: residual ratio, 0.2
    mlp = Linear(D, D/4, no bias) -> ReLU -> Linear(D/4, D, no bias) -> ReLU
    logits = tau * cos(f', t)              t: (C, D) frozen base classifier

With r = 0 the head is zero-shot CLIP. Only the MLP is trained, with CoOp's optimiser (Dassl ``sgd``: momentum 0.9,
weight decay 5e-4, lr 2e-3, batch 32, the warm-up and cosine of TaskRes), 50/100/200 epochs for 1/2-4/8-16 shots, on
the cached augmented views.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from taskres.engine import OptimConfig, fit
from taskres.errors import TaskResError
from taskres.methods.base import FitContext
from taskres.methods.taskres import zero_shot_logits


@dataclass(frozen=True)
class ClipAdapterConfig:
    ratio: float = 0.2  # r
    reduction: int = 4  # hidden width D / reduction

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 1 or self.reduction < 1:
            raise TaskResError(f"CLIP-Adapter needs 0 <= ratio <= 1 and reduction >= 1; got {self.ratio!r}, "
                               f"{self.reduction!r}.")


def coop_schedule_epochs(shots: int) -> int:
    """CoOp's configs for 1 / 2-4 / 8-16 shots: rn50_ep50, rn50_ep100, rn50 (200 epochs)."""
    return 50 if shots == 1 else 100 if shots <= 4 else 200


def optim_preset(shots: int, dataset: str) -> OptimConfig:
    """``taskres train --method clip-adapter``: CoOp's rn50*.yaml optimiser and Dassl's SGD defaults."""
    return OptimConfig(lr=2e-3, epochs=coop_schedule_epochs(shots), batch_size=32, weight_decay=5e-4,
                       optimizer="sgd", momentum=0.9)


class ClipAdapterHead(nn.Module):
    def __init__(self, base_text_features: torch.Tensor, logit_scale: float,
                 config: ClipAdapterConfig = ClipAdapterConfig()):
        super().__init__()
        self.config = config
        dim = base_text_features.shape[1]
        self.register_buffer("base_text_features", base_text_features.detach().float().clone())  # (C, D)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.adapter = nn.Sequential(nn.Linear(dim, dim // config.reduction, bias=False), nn.ReLU(),
                                     nn.Linear(dim // config.reduction, dim, bias=False), nn.ReLU())

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) raw image features -> (N, C) logits."""
        f = image_features.float()
        r = self.config.ratio
        f = r * self.adapter(f) + (1 - r) * f
        return zero_shot_logits(f, self.base_text_features, self.logit_scale)

    def select_classes(self, rows: list[int]) -> "ClipAdapterHead":
        tensors, meta = self.export()
        tensors["base_text_features"] = tensors["base_text_features"][rows]
        return ClipAdapterHead.from_export(tensors, meta)

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"base_text_features": self.base_text_features, **{f"adapter.{k}": v for k, v in
                                                                      self.adapter.state_dict().items()}}
        meta = {**asdict(self.config), "logit_scale": float(self.logit_scale)}
        return {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, meta

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "ClipAdapterHead":
        config = ClipAdapterConfig(ratio=float(meta["ratio"]), reduction=int(meta["reduction"]))
        head = cls(tensors["base_text_features"], float(meta["logit_scale"]), config)
        head.adapter.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
        return head


def fit_clip_adapter(ctx: FitContext, config: ClipAdapterConfig) -> ClipAdapterHead:
    with torch.random.fork_rng(devices=[]):  # the MLP's default init, drawn from the run's seed only
        torch.manual_seed(ctx.seed)
        head = ClipAdapterHead(ctx.base, ctx.logit_scale, config)
    fit(head, ctx.train_views, ctx.train_labels, ctx.optim, seed=ctx.seed, device=ctx.device, on_epoch=ctx.on_epoch,
        quiet=ctx.quiet)
    return head.cpu()
