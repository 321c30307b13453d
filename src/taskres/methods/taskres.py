"""TaskRes (Yu et al., CVPR 2023): a frozen base classifier plus a learned, prior-independent residual.

    t' = t + alpha * x                             x: (C, D), zero at init       (TaskRes-T)
    z' = z + alpha * r                             r: (1, D), zero at init       (TaskRes-I)
    logits = tau * cos(z', t')                     tau = exp(CLIP's logit_scale)

At initialisation the head is exactly zero-shot CLIP. Only the residuals (and alpha, when learned) are trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taskres.errors import TaskResError

VARIANTS = ("text", "image", "both")


@dataclass(frozen=True)
class TaskResConfig:
    alpha: float = 0.5
    variant: str = "text"
    learn_alpha: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise TaskResError(f"--variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}.")
        if not self.alpha > 0 and not self.learn_alpha:
            raise TaskResError(f"--alpha must be > 0 (the residual scale); got {self.alpha!r}.")


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(N, D) x (C, D) -> (N, C): tau * cosine similarity."""
    return logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(classifier, dim=-1).t()


class TaskResHead(nn.Module):
    def __init__(self, base_text_features: torch.Tensor, logit_scale: float, config: TaskResConfig = TaskResConfig()):
        super().__init__()
        self.config = config
        num_classes, dim = base_text_features.shape
        self.register_buffer("base_text_features", base_text_features.detach().float().clone())  # (C, D)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        text = config.variant in ("text", "both")
        image = config.variant in ("image", "both")
        residual = torch.zeros(num_classes, dim)
        if text:
            self.text_feature_residuals = nn.Parameter(residual)  # (C, D)
        else:
            self.register_buffer("text_feature_residuals", residual)
        if image:
            self.image_feature_residual = nn.Parameter(torch.zeros(1, dim))  # (1, D)
        else:
            self.image_feature_residual = None
        if config.learn_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(config.alpha)))
        else:
            self.register_buffer("alpha", torch.tensor(float(config.alpha)))

    def classifier(self) -> torch.Tensor:
        """The tuned classifier t + alpha * x, un-normalised: (C, D)."""
        return self.base_text_features + self.alpha * self.text_feature_residuals

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) un-normalised image features -> (N, C) logits."""
        z = image_features.float()
        if self.image_feature_residual is not None:
            z = z + self.alpha * self.image_feature_residual
        return zero_shot_logits(z, self.classifier(), self.logit_scale)

    def select_classes(self, rows: list[int]) -> "TaskResHead":
        """A head over a subset of classes (rows of the classifier, in the given order), e.g. ImageNet-A's 200."""
        tensors, meta = self.export()
        for name in ("base_text_features", "text_feature_residuals"):
            tensors[name] = tensors[name][rows]
        return TaskResHead.from_export(tensors, meta)

    # ---- checkpoint -----------------------------------------------------------------------------------------------

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors named as in the official checkpoints, plus the config for the metadata."""
        tensors = {"base_text_features": self.base_text_features,
                   "text_feature_residuals": self.text_feature_residuals.detach()}
        if self.image_feature_residual is not None:
            tensors["image_feature_residual"] = self.image_feature_residual.detach()
        meta = {**asdict(self.config), "alpha_init": self.config.alpha, "alpha": float(self.alpha.detach()),
                "logit_scale": float(self.logit_scale)}
        return {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, meta

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "TaskResHead":
        config = TaskResConfig(alpha=float(meta["alpha"]), variant=meta["variant"],
                               learn_alpha=bool(meta["learn_alpha"]))
        head = cls(tensors["base_text_features"], float(meta["logit_scale"]), config)
        with torch.no_grad():
            head.text_feature_residuals.copy_(tensors["text_feature_residuals"])
            if head.image_feature_residual is not None:
                head.image_feature_residual.copy_(tensors["image_feature_residual"])
        return head
