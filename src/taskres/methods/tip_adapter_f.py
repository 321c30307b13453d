"""Tip-Adapter-F: Tip-Adapter's cache keys K become trainable, initialised from the cache (gaopengcuhk/Tip-Adapter
``main.py``, ``run_tip_adapter_F``).

Trained with the initial a and b, by cross-entropy on the few-shot images, a fresh augmented view of every image
each epoch (a view of the cached bank, or a fresh one with ``--views online``).
AdamW (lr 1e-3, eps 1e-4, weight decay 0.01: torch's default, which
the public code keeps), cosine over all iterations, batch 256, the partial batch kept, 20 epochs (EuroSAT: 100).
The public code picks the epoch by test accuracy; here the epoch with the best few-shot validation accuracy is kept
(first best), then a and b are searched on the validation split as for Tip-Adapter. Only K changes.
"""

from __future__ import annotations

from typing import Any

import torch

from taskres.engine import OptimConfig
from taskres.errors import TaskResValueError
from taskres.methods.base import FitContext, Fitted
from taskres.methods.registry import Method, register_method, search_none, searches_on_val
from taskres.methods.tip_adapter import (
    PUBLIC,
    TipAdapterConfig,
    TipAdapterHead,
    build_cache,
    choose_alpha_beta,
    require_val,
)


def optim_preset(shots: int, dataset: str) -> OptimConfig:
    """Tip-Adapter-F's optimiser: ``taskres train --method tip-adapter-f`` (configs/<dataset>.yaml: train_epoch)."""
    return OptimConfig(
        lr=1e-3,
        epochs=100 if dataset == "eurosat" else 20,
        batch_size=256,
        weight_decay=0.01,
        optimizer="adamw",
        eps=1e-4,
        schedule="iteration",
        warmup_epochs=0,
        drop_last="never",
    )


def fit_tip_adapter_f(ctx: FitContext, config: TipAdapterConfig) -> Fitted:
    keys, values = build_cache(ctx.train_views, ctx.train_labels, ctx.base.shape[0])
    head = TipAdapterHead(
        ctx.base, keys, values, ctx.logit_scale, config.init_alpha, config.init_beta, train_keys=True, config=config
    )
    official = ctx.protocol == "official"  # the public code keeps the best test epoch
    select = config.search == "val" or official
    if official and ctx.test_features is None:
        raise TaskResValueError(
            "the official Tip-Adapter-F protocol keeps its best test epoch, and the fit context has no test split.",
            param="protocol",
        )
    if select and not official:
        require_val(ctx)
    features, labels, key = (
        (ctx.test_features, ctx.test_labels, "test_accuracy")
        if official
        else (ctx.val_features, ctx.val_labels, "val_accuracy")
    )
    assert ctx.optim is not None  # a trained method
    best: dict[str, Any] = {"accuracy": -1.0, "epoch": ctx.optim.epochs - 1, "keys": None}

    def on_epoch(record: dict) -> None:
        if select:
            assert features is not None and labels is not None  # checked above: the test split or require_val
            with torch.no_grad():
                device = head.cache_keys.device
                pred = head(features.to(device)).argmax(dim=1).cpu()
            record[key] = 100.0 * float((pred == labels).float().mean())
            if record[key] > best["accuracy"]:
                best.update(accuracy=record[key], epoch=record["epoch"], keys=head.cache_keys.detach().clone())
        if ctx.on_epoch is not None:
            ctx.on_epoch(record)

    ctx.train(head, on_epoch=on_epoch)
    if best["keys"] is not None:
        with torch.no_grad():
            head.cache_keys.copy_(best["keys"])
    info = {"tip_f_epoch": best["epoch"], **({"test_selected": True} if official else {})}
    return Fitted(choose_alpha_beta(head.cpu(), ctx, config, info), info)


register_method(
    Method(
        "tip-adapter-f",
        "Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned (Zhang et al. 2022)",
        TipAdapterConfig,
        TipAdapterHead,
        fit_tip_adapter_f,
        optim_preset=optim_preset,
        config_preset=TipAdapterConfig.for_dataset,
        official=PUBLIC,
        views=10,
        val_option=searches_on_val,
        no_val_options=search_none,
    )
)  # the public cache: 10 augmented epochs
