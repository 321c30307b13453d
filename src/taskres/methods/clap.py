"""CLAP, class-adaptive linear probing (Silva-Rodriguez et al., CVPR 2024), as jusiro/CLAP ``trainers/adapters.py``
with ``INIT ZS``, ``CONSTRAINT l2``: ZS-LP (``zs_lp.py``) plus a penalty that keeps each class prototype near its
zero-shot position, with one weight per class,

    loss = CE(tau * cos(f, w), y) + mean_c lambda_c ||w_c - t_c||^2      t: (C, D) the (un-normalised) base
    lambda_c = mean over the support features of class c of softmax(tau * cos(f, t))_c

i.e. the zero-shot confidence in the right class, measured on the same pool of augmented support features the probe
trains on (``init_lagrangian_multipliers``), fixed for the whole training. The prototypes start at t, so the head is
zero-shot CLIP at initialisation and the penalty starts at zero. Everything else (optimiser, schedule, the pool of
20 views, batches, last epoch) is ZS-LP's, the public ``SGD_lr1e-1_B256_ep300.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taskres.methods.base import FitContext, Fitted, cosine_logits
from taskres.methods.registry import Method, register_method
from taskres.methods.zs_lp import POOL_VIEWS, ZSLPHead, init_head, optim_preset, pooled_views, train_pooled


@dataclass(frozen=True)
class CLAPConfig:
    """CLAP's weights come from the data; there is nothing to set beyond the optimiser."""


@torch.no_grad()
def penalty_weights(
    features: torch.Tensor, labels: torch.Tensor, base: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """(C,) lambda_c: the mean zero-shot probability of class c over the rows of class c (0 for absent classes)."""
    probs = cosine_logits(features.float(), base.float(), logit_scale).softmax(dim=-1)  # (M, C)
    num_classes = base.shape[0]
    own = probs[torch.arange(len(labels)), labels]  # (M,)
    sums = torch.zeros(num_classes, dtype=own.dtype, device=own.device).index_add_(0, labels, own)
    counts = torch.bincount(labels, minlength=num_classes).to(own.dtype)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


def class_penalty(prototypes: torch.Tensor, base: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_c lambda_c ||w_c - t_c||^2."""
    return (weights * (prototypes - base).pow(2).sum(dim=-1)).mean()


def fit_clap(ctx: FitContext, config: CLAPConfig) -> Fitted:
    head = init_head(ctx, config)
    pool, labels = pooled_views(ctx)
    weights = penalty_weights(pool, labels, ctx.base, ctx.logit_scale).to(ctx.device)
    train_pooled(head, ctx, pool, labels, penalty=lambda h: class_penalty(h.prototypes, h.base_text_features, weights))
    info = {
        "pool_size": len(pool),
        "clap_lambda": [float(w) for w in weights.cpu()],
        "clap_lambda_mean": float(weights.mean()),
        "clap_prototype_shift": float((head.prototypes.detach() - head.base_text_features).norm(dim=-1).mean()),
    }
    return Fitted(head.cpu(), info)


register_method(
    Method(
        "clap",
        "CLAP: ZS-LP plus a class-wise penalty towards the zero-shot prototypes, weighted by zero-shot "
        "confidence on the support set (Silva-Rodriguez et al. 2024)",
        CLAPConfig,
        ZSLPHead,
        fit_clap,
        optim_preset=optim_preset,
        views=POOL_VIEWS,
        init_head=init_head,
    )
)
