"""Zero-shot CLIP (Radford et al. 2021): the text classifier as it is, nothing learned.

    logits = tau * cos(f, t)                       t: (C, D), the base classifier; tau = exp(CLIP's logit_scale)

The baseline that every other method is measured against: ``taskres zeroshot`` evaluates it, and ``taskres train``
reports its accuracy beside the trained method's (``zero_shot_accuracy``). The base t is the mean text embedding over
the dataset's templates; the official variant is CoOp's ``ZeroshotCLIP``, the papers' zero-shot row: one template
per benchmark, "_" replaced by a space, each prompt's feature normalised before the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import torch

from taskres.methods.base import CosineHead, FitContext, Fitted
from taskres.methods.registry import Method, OfficialVariant, register_method

ZERO_SHOT: Final = "zero-shot"


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot CLIP has no settings."""


def zero_shot_head(base: torch.Tensor, logit_scale: float) -> CosineHead:
    """Zero-shot CLIP over the base classifier ``base`` (C, D)."""
    return CosineHead(base, logit_scale)  # saved as its base classifier and logit scale


def fit_zero_shot(ctx: FitContext, config: ZeroShotConfig) -> Fitted:
    return Fitted(zero_shot_head(ctx.base, ctx.logit_scale))


register_method(
    Method(
        ZERO_SHOT,
        "Zero-shot CLIP: the text classifier t as it is, tau * cos(f, t); nothing is learned (Radford et al. 2021)",
        ZeroShotConfig,
        CosineHead,
        fit_zero_shot,
        views=0,
        test_view_only=True,
        init_head=lambda ctx, config: zero_shot_head(ctx.base, ctx.logit_scale),
        # CoOp's ZeroshotCLIP: its one template per benchmark, each prompt's feature normalised, all in fp16.
        official=OfficialVariant(views=0, base="zeroshot_clip", templates="coop_zeroshot"),
    )
)
