"""TaskRes (Yu et al., CVPR 2023): a frozen base classifier plus a learned, prior-independent residual.

    t' = t + alpha * x                             x: (C, D), zero at init       (TaskRes-T)
    z' = z + alpha * r                             r: (1, D), zero at init       (TaskRes-I)
    logits = tau * cos(z', t')                     tau = exp(CLIP's logit_scale)

At initialisation the head is exactly zero-shot CLIP. Only the residuals (and alpha, when learned) are trained.
TaskRes* replaces t by an enhanced base (``enhanced_base.py``) before the residual is trained. The presets are the
paper's (docs/protocol.md#optimisation): Adam, lr 2e-3 (2e-4 on ImageNet), batch 256, weight decay 5e-4, 100 epochs
up to 4 shots and 200 above; alpha 0.5 (1.0 on Flowers102).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from taskres.engine import OptimConfig
from taskres.errors import TaskResValueError, check_choice, invalid
from taskres.methods._fused import ResidualTraining
from taskres.methods.base import Artifact, CosineHead, FitContext, Fitted, Head, option
from taskres.methods.enhanced_base import (
    PROJECTION_FILE,
    EnhancedBaseConfig,
    enhanced_base,
    load_projection,
    projection_artifact,
)
from taskres.methods.registry import Method, OfficialVariant, register_method, searches_on_val

Variant = Literal["text", "image", "both"]
VARIANTS: tuple[str, ...] = ("text", "image", "both")
IMAGENET_FAMILY = ("imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


@dataclass(frozen=True)
class TaskResConfig:
    alpha: float = field(
        default=0.5, metadata=option("--alpha", "residual scale alpha (default 0.5; 1.0 for Flowers102)")
    )
    variant: Variant = field(
        default="text", metadata=option("--variant", "TaskRes-T (text), TaskRes-I (image) or both (default text)")
    )
    learn_alpha: bool = field(default=False, metadata=option("--learn-alpha", "train alpha as a scalar parameter"))
    # TaskRes*: the enhanced base, from a file or tuned now (at most one of the two).
    base_weights: str | None = field(
        default=None,
        metadata=option(
            "--base-weights",
            "(TaskRes*) rebuild the base with this text projection: a strong_base .../model.pth.tar "
            "or a text_projection.safetensors from --enhance-base",
            metavar="FILE",
        ),
    )
    enhance_base: bool = field(
        default=False,
        metadata=option(
            "--enhance-base",
            "(TaskRes*) tune the text projection for 50 epochs first, save it as "
            "RUN/text_projection.safetensors and train the residual on the enhanced base",
        ),
    )
    search: Literal["val", "none"] | None = field(
        default=None,
        metadata=option(
            "--search",
            "(TaskRes*, with --enhance-base) pick the base's lr on the few-shot validation split (val, the "
            "default) or not (none)",
        ),
    )

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        if not math.isfinite(self.alpha):
            raise invalid("alpha", "be a finite number (the residual scale)", self.alpha)
        if not self.alpha > 0 and not self.learn_alpha:
            raise invalid("alpha", "be > 0 (the residual scale)", self.alpha)
        if self.base_weights is not None and self.enhance_base:
            raise TaskResValueError(
                "pass either `base_weights` (a released or saved projection) or "
                "`enhance_base` (tune "
                "one now), not both.",
                param="base_weights",
            )
        if self.search is not None:
            check_choice("search", self.search, ("val", "none"))
            if self.base_weights is None and not self.enhance_base:
                raise TaskResValueError(
                    "`search` applies to taskres only with `enhance_base` (it picks the base's lr).", param="search"
                )

    @property
    def enhanced_base(self) -> EnhancedBaseConfig | None:
        """TaskRes*'s base settings, or None for the regular base."""
        if self.base_weights is None and not self.enhance_base:
            return None
        return EnhancedBaseConfig(weights=self.base_weights, tune=self.enhance_base, search=self.search or "val")

    def check(self) -> None:
        """Checks that read files, run before any image is encoded: a bad --base-weights file fails early."""
        if self.base_weights is not None:
            load_projection(self.base_weights)


class TaskResHead(ResidualTraining, CosineHead):
    """logits = tau * cos(z + alpha * r, t + alpha * x); trained in the fused form while alpha is fixed (_fused)."""

    class_rows = ("base_text_features", "text_feature_residuals")
    config_cls = TaskResConfig
    config_fields = ("alpha", "variant", "learn_alpha")  # the rest shapes the base before the head exists
    scalars = ("alpha", "logit_scale")  # alpha as trained (learn_alpha)
    text_feature_residuals: torch.Tensor  # a parameter or a buffer, by variant
    alpha: torch.Tensor  # a parameter or a buffer, by learn_alpha

    def __init__(self, base_text_features: torch.Tensor, logit_scale: float, config: TaskResConfig = TaskResConfig()):
        super().__init__(base_text_features, logit_scale)
        self.config = config
        num_classes, dim = base_text_features.shape
        residual = torch.zeros(num_classes, dim)
        if config.variant in ("text", "both"):
            self.text_feature_residuals = nn.Parameter(residual)  # x: (C, D)
        else:
            self.register_buffer("text_feature_residuals", residual)
        self.image_feature_residual = (
            nn.Parameter(torch.zeros(1, dim)) if config.variant in ("image", "both") else None
        )  # r: (1, D)
        if config.learn_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(config.alpha)))
        else:
            self.register_buffer("alpha", torch.tensor(float(config.alpha)))

    def classifier(self) -> torch.Tensor:
        """The tuned classifier t + alpha * x, un-normalised: (C, D)."""
        return self.base_text_features + self.alpha * self.text_feature_residuals

    def image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        z = image_features.float()  # (N, D)
        if self.image_feature_residual is not None:
            z = z + self.alpha * self.image_feature_residual
        return z

    def image_side_trains(self) -> bool:
        return self.image_feature_residual is not None

    def fixed_residual(self) -> tuple[torch.Tensor, float] | None:
        return None if self.config.learn_alpha else (self.text_feature_residuals, float(self.config.alpha))

    def residual_mean_abs(self) -> float:
        """Mean |x| over the residual's entries: the paper's residual magnitude (its Fig. 4)."""
        return float(self.text_feature_residuals.detach().abs().mean())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named as in the official checkpoints (plus the image residual of TaskRes-I)."""
        out = {"base_text_features": self.base_text_features, "text_feature_residuals": self.text_feature_residuals}
        if self.image_feature_residual is not None:
            out["image_feature_residual"] = self.image_feature_residual
        return out


def optim_preset(shots: int, dataset: str) -> OptimConfig:
    """``taskres train``: lr 2e-3 (2e-4 on ImageNet), batch 256, weight decay 5e-4, 100 epochs for K <= 4, else 200."""
    lr = 2e-4 if dataset in IMAGENET_FAMILY else 2e-3
    return OptimConfig(lr=lr, epochs=100 if shots <= 4 else 200, batch_size=256, weight_decay=5e-4)


def config_preset(dataset: str) -> TaskResConfig:
    """alpha 0.5, 1.0 for Flowers102 (the paper's configs)."""
    return TaskResConfig(alpha=1.0 if dataset == "oxford_flowers" else 0.5)


def init_head(ctx: FitContext, config: TaskResConfig) -> TaskResHead:
    return TaskResHead(ctx.base, ctx.logit_scale, config)


def fit_taskres(ctx: FitContext, config: TaskResConfig) -> Fitted:
    """The residual trained on the base; for TaskRes*, on the enhanced base, which is evaluated beside the head
    (``enhanced_base_accuracy``) and, tuned now, saved with the run."""
    base = ctx.base
    info: dict[str, Any] = {}
    extra_heads: dict[str, Head] = {}
    artifacts: list[Artifact] = []
    if config.enhanced_base is not None:  # TaskRes*
        base, projection, info = enhanced_base(ctx, config.enhanced_base)
        extra_heads["enhanced_base"] = TaskResHead(base, ctx.logit_scale)
        if config.enhance_base:
            artifacts.append(projection_artifact(ctx, projection))
    head = TaskResHead(base, ctx.logit_scale, config)
    ctx.train(head)
    info["residual_mean_abs"] = head.residual_mean_abs()
    return Fitted(head.cpu(), info, extra_heads, artifacts)


def base_record(config: TaskResConfig) -> dict | None:
    """config.json's "base": TaskRes*'s enhanced base settings, or None for the text classifier."""
    return asdict(config.enhanced_base) if config.enhanced_base is not None else None


def no_val_options(preset: TaskResConfig, options: Mapping[str, Any]) -> dict[str, Any]:
    """Under no-val, TaskRes*'s enhanced base takes its fixed lr (``search`` none); plain TaskRes selects nothing."""
    star = preset.search is not None or options.get("enhance_base") or options.get("base_weights")
    return {"search": "none"} if star else {}


register_method(
    Method(
        "taskres",
        "Task Residual: frozen text classifier t plus a learned residual, t + alpha * x (Yu et al. 2023); "
        "TaskRes* with --enhance-base or --base-weights",
        TaskResConfig,
        TaskResHead,
        fit_taskres,
        optim_preset=optim_preset,
        config_preset=config_preset,
        init_head=init_head,
        files=(PROJECTION_FILE,),
        # The official trainer: a fresh augmentation every epoch, the base from the fp16 text encoder.
        official=OfficialVariant(views="online", base="fp16_text"),
        check_files=TaskResConfig.check,
        base_record=base_record,
        val_option=searches_on_val,
        no_val_options=no_val_options,
    )
)
