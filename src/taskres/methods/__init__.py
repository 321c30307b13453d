"""Methods are heads over cached features, registered by name. Each maps (N, D) image features to (N, C) logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from taskres.engine import OptimConfig, fit
from taskres.errors import TaskResError, suggest
from taskres.methods import clip_adapter, coop, linear_probe, tip_adapter, tip_adapter_f
from taskres.methods.base import FitContext
from taskres.methods.taskres import TaskResConfig, TaskResHead


@dataclass(frozen=True)
class MethodSpec:
    """A method: its config dataclass (defaults = the published preset), how it fits, how its head reloads.

    ``fit(ctx, config)`` returns a trained head mapping (N, D) features to (N, C) logits, with ``export()`` giving
    (tensors, metadata) for classifier.safetensors; ``load(tensors, metadata)`` rebuilds it.
    ``optim_preset(shots, dataset)`` is the method's published optimiser (None: training-free);
    ``config_preset(dataset)`` its config for a dataset (default: ``config_cls()``); ``views`` the default number of
    augmented views per training image; ``test_view_only``: it trains on the test-transform features (views = 0).
    """

    name: str
    summary: str
    config_cls: type
    fit: Callable[[FitContext, object], torch.nn.Module]
    load: Callable[[dict, dict], torch.nn.Module]
    optim_preset: Callable[[int, str], OptimConfig] | None = None
    config_preset: Callable[[str], object] | None = None
    views: int = 10
    test_view_only: bool = False

    def default_config(self, dataset: str = "") -> object:
        return self.config_preset(dataset) if self.config_preset is not None else self.config_cls()


IMAGENET_FAMILY = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def taskres_optim_preset(shots: int, dataset: str) -> OptimConfig:
    """TaskRes (SPEC "Optimisation"): Adam, lr 2e-3 (2e-4 for ImageNet), batch 256, weight decay 5e-4, 100 epochs
    for K <= 4, else 200."""
    lr = 2e-4 if dataset in IMAGENET_FAMILY else 2e-3
    return OptimConfig(lr=lr, epochs=100 if shots <= 4 else 200, batch_size=256, weight_decay=5e-4)


def taskres_config_preset(dataset: str) -> TaskResConfig:
    """alpha 0.5, 1.0 for Flowers102 (the paper's configs)."""
    return TaskResConfig(alpha=1.0 if dataset == "oxford_flowers" else 0.5)


def _fit_taskres(ctx: FitContext, config: TaskResConfig) -> TaskResHead:
    head = TaskResHead(ctx.base, ctx.logit_scale, config)
    fit(head, ctx.train_views, ctx.train_labels, ctx.optim, seed=ctx.seed, device=ctx.device, on_epoch=ctx.on_epoch,
        quiet=ctx.quiet)
    ctx.extras["residual_mean_abs"] = float(head.text_feature_residuals.detach().abs().mean())
    return head.cpu()


METHODS: dict[str, MethodSpec] = {
    "taskres": MethodSpec(
        "taskres", "Task Residual: frozen text classifier t plus a learned residual, t + alpha * x (Yu et al. "
        "2023); TaskRes* with --enhance-base or --base-weights",
        TaskResConfig, _fit_taskres, TaskResHead.from_export, optim_preset=taskres_optim_preset,
        config_preset=taskres_config_preset),
    "linear-probe": MethodSpec(
        "linear-probe", "Linear probe: logistic regression on raw image features, C searched on val (CoOp lpclip)",
        linear_probe.LinearProbeConfig, linear_probe.fit_linear_probe, linear_probe.LinearProbeHead.from_export,
        views=0, test_view_only=True),
    "clip-adapter": MethodSpec(
        "clip-adapter", "CLIP-Adapter: residual MLP on the image feature, r * mlp(f) + (1 - r) * f (Gao et al.)",
        clip_adapter.ClipAdapterConfig, clip_adapter.fit_clip_adapter, clip_adapter.ClipAdapterHead.from_export,
        optim_preset=clip_adapter.optim_preset),
    "tip-adapter": MethodSpec(
        "tip-adapter", "Tip-Adapter: training-free key-value cache of the few-shot features (Zhang et al. 2022)",
        tip_adapter.TipAdapterConfig, tip_adapter.fit_tip_adapter, tip_adapter.TipAdapterHead.from_export,
        config_preset=tip_adapter.TipAdapterConfig.for_dataset),
    "tip-adapter-f": MethodSpec(
        "tip-adapter-f", "Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (Zhang et al. 2022)",
        tip_adapter.TipAdapterConfig, tip_adapter_f.fit_tip_adapter_f, tip_adapter.TipAdapterHead.from_export,
        optim_preset=tip_adapter_f.optim_preset, config_preset=tip_adapter.TipAdapterConfig.for_dataset),
    "coop": MethodSpec(
        "coop", "CoOp: 16 learned context vectors through the frozen text encoder (Zhou et al. 2022)",
        coop.CoOpConfig, coop.fit_coop, coop.CoOpHead.from_export, optim_preset=coop.optim_preset),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise TaskResError(f"unknown method {name!r}; {suggest(name, METHODS)}known: {', '.join(METHODS)}.")
    return METHODS[name]


def list_methods() -> list[str]:
    return list(METHODS)
