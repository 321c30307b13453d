"""ZS-LP (Silva-Rodriguez et al., CVPR 2024), as jusiro/CLAP ``trainers/adapters.py`` with ``INIT ZS``,
``CONSTRAINT none``: a cosine linear probe whose class prototypes start at the zero-shot classifier,

    logits = tau * cos(f, w_c)          f: (N, D) raw image feature;  w: (C, D) trained, w = t at initialisation

so the head is exactly zero-shot CLIP before training. Only the prototypes are trained. CLAP (``clap.py``) is the
same probe with a penalty that keeps each prototype near its zero-shot position.

The public settings (``configs/trainers/SGD_lr1e-1_B256_ep300.yaml``, the same for every dataset, shot count and
backbone): Dassl ``sgd`` (momentum 0.9), lr 0.1, no weight decay, one warm-up epoch at 1e-5 then cosine per epoch,
300 epochs, batch 256, last epoch (no validation). The training set is a pool of 20 augmented views of every support
image (``epochs_aumentation = 20``), encoded once; an epoch shuffles the whole pool and takes as many batches of 256
as Dassl's loader over the N support images has (N // 256 when N >= 256, else one), so an epoch sees about N of the
20 N pooled features.

Why not ``ctx.train``: the engine reads one view per image per epoch; this loop draws its batches from the pooled
views as the public ``run_epoch`` does, and CLAP adds its penalty to the loss. The optimiser and schedule are the
engine's (``make_optimizer``, ``epoch_lr``); the shuffle is seeded from ``ctx.seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taskres.engine import OptimConfig, check_finite, epoch_lr, iteration_lr, make_optimizer
from taskres.errors import TaskResValueError
from taskres.methods.base import CosineHead, FitContext, Fitted
from taskres.methods.registry import Method, register_method
from taskres.views import as_bank

POOL_VIEWS = 20  # the public code's epochs_aumentation


@dataclass(frozen=True)
class ZSLPConfig:
    """ZS-LP has nothing to set beyond the optimiser (CLAP's point: one setting for every task)."""


class ZSLPHead(CosineHead):
    """tau * cos(f, w) with trainable prototypes w (C, D), initialised at the base classifier t."""

    class_rows = ("base_text_features", "prototypes")

    def __init__(self, base_text_features: torch.Tensor, logit_scale: float):
        super().__init__(base_text_features, logit_scale)
        self.prototypes = nn.Parameter(self.base_text_features.clone())  # w: (C, D)

    def classifier(self) -> torch.Tensor:
        return self.prototypes

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"base_text_features": self.base_text_features, "prototypes": self.prototypes}


def optim_preset(shots: int, dataset: str) -> OptimConfig:
    """CLAP's ``SGD_lr1e-1_B256_ep300.yaml`` for every dataset and shot count (ZS-LP and CLAP alike)."""
    return OptimConfig(
        lr=0.1,
        epochs=300,
        batch_size=256,
        weight_decay=0.0,
        optimizer="sgd",
        momentum=0.9,
        warmup_epochs=1,
        warmup_lr=1e-5,
    )


def pooled_views(ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(V * N, D) raw features of every view of every support image and their (V * N,) labels."""
    bank = as_bank(ctx.train_views, POOL_VIEWS).float()  # (V, N, D)
    return bank.reshape(-1, bank.shape[-1]), ctx.train_labels.repeat(bank.shape[0])


def batches_per_epoch(num_images: int, optim: OptimConfig) -> int:
    """Dassl's training loader over the N support images: N // B batches when a full one exists (drop_last), else
    one; ``drop_last`` never: ceil(N / B)."""
    if optim.drop_last == "never" or num_images < optim.batch_size:
        return math.ceil(num_images / optim.batch_size)
    return num_images // optim.batch_size


def train_pooled(
    head: ZSLPHead,
    ctx: FitContext,
    pool: torch.Tensor,
    pool_labels: torch.Tensor,
    penalty: Callable[[ZSLPHead], torch.Tensor] | None = None,
) -> list[dict]:
    """Train the prototypes on batches drawn from the shuffled pool, cross-entropy plus ``penalty(head)``."""
    optim = ctx.optim
    if optim is None:
        raise TaskResValueError("ZS-LP and CLAP are trained and need an optimiser.", param="optim")
    device = ctx.device
    head.to(device).train()
    pool, pool_labels = pool.to(device), pool_labels.to(device)
    params = [head.prototypes]
    optimizer = make_optimizer(params, optim)
    generator = torch.Generator().manual_seed(ctx.seed)
    steps = batches_per_epoch(len(ctx.train_labels), optim)
    total = optim.epochs * steps
    history = []
    for epoch in range(optim.epochs):
        order = torch.randperm(len(pool), generator=generator).to(device)
        lr = epoch_lr(optim, epoch) if optim.schedule == "epoch" else iteration_lr(optim, epoch * steps, total)
        total_loss, total_penalty, correct, seen = 0.0, 0.0, 0, 0
        for step in range(steps):
            lr_now = lr if optim.schedule == "epoch" else iteration_lr(optim, epoch * steps + step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            idx = order[step * optim.batch_size : (step + 1) * optim.batch_size]
            logits = head.train_logits(head.train_inputs(pool[idx]))
            loss = F.cross_entropy(logits, pool_labels[idx])
            extra = penalty(head) if penalty is not None else None
            if extra is not None:
                loss = loss + extra
                total_penalty += extra.item() * len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == pool_labels[idx]).sum())
            seen += len(idx)
        record = {"epoch": epoch, "lr": lr, "loss": total_loss / seen, "train_accuracy": 100.0 * correct / seen}
        if penalty is not None:
            record["penalty"] = total_penalty / seen
        check_finite(record, params, optim, epoch)
        history.append(record)
        if ctx.on_epoch is not None:
            ctx.on_epoch(record)
    head.eval()
    return history


def init_head(ctx: FitContext, config) -> ZSLPHead:
    return ZSLPHead(ctx.base, ctx.logit_scale)


def fit_zs_lp(ctx: FitContext, config: ZSLPConfig) -> Fitted:
    head = init_head(ctx, config)
    pool, labels = pooled_views(ctx)
    train_pooled(head, ctx, pool, labels)
    return Fitted(head.cpu(), {"pool_size": len(pool)})


register_method(
    Method(
        "zs-lp",
        "ZS-LP: cosine linear probe initialised at the zero-shot prototypes, one fixed SGD setting "
        "(Silva-Rodriguez et al. 2024)",
        ZSLPConfig,
        ZSLPHead,
        fit_zs_lp,
        optim_preset=optim_preset,
        views=POOL_VIEWS,
        init_head=init_head,
    )
)
