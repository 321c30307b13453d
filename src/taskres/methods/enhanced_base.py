"""TaskRes* (the paper's enhanced base): the base classifier rebuilt after replacing CLIP's text projection.

The projection is the text encoder's last operation, so the base for a projection P (W, D) is

    t(P)_c = mean over templates of  h_{c,k} @ P        h_{c,k}: (W,) pre-projection feature of template k, class c

and the h are computed once. ``--base-weights FILE`` reads P from the authors' released
``strong_base/<Dataset>/rn50_<K>shots/model.pth.tar`` (``state_dict["weight"]`` is a linear layer's weight, (D, W),
so P = weight.t(); the file also pickles optimiser and scheduler objects, read inertly by ``taskres.safe_load``) or
from our own ``text_projection.safetensors``. The official code applies the file only when CLIP runs in fp16; here
it applies in every precision (the projection is done in fp32).

``--enhance-base`` tunes P itself, from CLIP's, on the few-shot training features for 50 epochs (the paper's only
stated setting) by cross-entropy of ``tau * cos(f, t(P))``. The optimiser and learning rate are not public: Adam, the
TaskRes schedule (warm-up epoch, cosine), batch 256, no weight decay, and the learning rate picked on the few-shot
validation split from ``lrs`` (first best; ``search="none"`` or no validation split: ``lr``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from taskres.atomic import write_safetensors
from taskres.backbones import Backbone
from taskres.engine import OptimConfig, fit
from taskres.errors import TaskResFileNotFoundError, TaskResValueError
from taskres.methods.base import Artifact, FitContext, cosine_logits
from taskres.safe_load import load_checkpoint
from taskres.text import check_templates
from taskres.text_tower import check_text_tower, pooled_text, projection
from taskres.views import TrainViews

logger = logging.getLogger(__name__)

PROJECTION_FILE = "text_projection.safetensors"  # RUN/ file of --enhance-base


@dataclass(frozen=True)
class EnhancedBaseConfig:
    """Where the enhanced base's projection comes from: a file (``weights``) or tuning (``tune``)."""

    weights: str | None = None
    tune: bool = False
    epochs: int = 50
    lr: float = 1e-3  # used without a search (search="none" or no validation split)
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    search: str = "val"
    batch_size: int = 256
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lrs", tuple(float(x) for x in self.lrs))
        if (self.weights is None) == (not self.tune):
            raise TaskResValueError("an enhanced base needs exactly one source: --base-weights FILE or --enhance-base.")
        if self.search not in ("val", "none"):
            raise TaskResValueError(f"--search must be 'val' or 'none'; got {self.search!r}.")
        if self.epochs < 1 or not self.lr > 0 or not all(x > 0 for x in self.lrs):
            raise TaskResValueError(
                "the base tuning needs epochs >= 1 and positive learning rates; got "
                f"{self.epochs!r}, "
                f"{self.lr!r}, {self.lrs!r}."
            )

    def optim(self, lr: float) -> OptimConfig:
        return OptimConfig(lr=lr, epochs=self.epochs, batch_size=self.batch_size, weight_decay=self.weight_decay)


@torch.no_grad()
def pre_projection_features(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, T, W) float32: the pooled text features before the projection, names as written.

    See docs/protocol.md#base-classifier.
    """
    model = check_text_tower(backbone, "the enhanced base")
    templates = check_templates(templates)
    rows = []
    for name in classnames:
        tokens = backbone.tokenizer([t.format(name) for t in templates]).to(backbone.device)
        rows.append(pooled_text(model, tokens).float())  # (T, W)
    return torch.stack(rows).cpu()


def base_from_projection(pre: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """(C, T, W) x (W, D) -> (C, D): the mean over templates of the projected features, per class as the base."""
    return torch.stack([(h @ proj).mean(dim=0) for h in pre.float()])


def load_projection(path: str | Path) -> torch.Tensor:
    """(W, D) float32 text projection from our safetensors export or a ``strong_base`` checkpoint."""
    path = Path(path)
    what = "--base-weights file"
    if not path.is_file():
        raise TaskResFileNotFoundError(
            f"{what} {str(path)!r} does not exist; pass a strong_base "
            ".../model.pth.tar or a "
            f"{PROJECTION_FILE} written by --enhance-base."
        )
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                if "text_projection" not in f.keys():
                    raise TaskResValueError(
                        f"{what} {str(path)!r} has no 'text_projection' tensor; pass a "
                        f"{PROJECTION_FILE} written by --enhance-base."
                    )
                proj = f.get_tensor("text_projection")
        except (SafetensorError, OSError) as err:
            raise TaskResValueError(f"{what} {str(path)!r} is not a readable safetensors file ({err}).") from None
    else:
        ckpt = load_checkpoint(path, what)
        state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        weight = state.get("weight") if isinstance(state, dict) else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TaskResValueError(
                f"{what} {str(path)!r} does not hold state_dict['weight'] as a 2-D tensor (the "
                "strong_base layout: a linear layer's (D, W) weight)."
            )
        proj = weight.t()
    if proj.dim() != 2:
        raise TaskResValueError(f"{what} {str(path)!r}: the text projection must be 2-D; got {tuple(proj.shape)}.")
    return proj.float().contiguous()


def save_projection(path: str | Path, proj: torch.Tensor, metadata: dict[str, str]) -> None:
    """The projection as a safetensors file with deterministic bytes (an identical run writes an identical file)."""
    write_safetensors(
        path,
        {"text_projection": proj.detach().float().contiguous().cpu()},
        metadata={"format": "taskres-text-projection-1", "layout": "(W, D): pooled @ text_projection", **metadata},
    )


def projection_artifact(ctx: FitContext, proj: torch.Tensor) -> Artifact:
    """RUN/text_projection.safetensors: the tuned projection, with the backbone, dataset, shots and seed it was
    tuned for (``--base-weights`` reads it back)."""
    meta = {
        "backbone": json.dumps(ctx.backbone.identity.to_json() if ctx.backbone is not None else None),
        "dataset": ctx.dataset,
        "shots": str(ctx.shots),
        "seed": str(ctx.seed),
    }
    return Artifact(PROJECTION_FILE, lambda path: save_projection(path, proj, meta), metrics_key="text_projection_file")


class ProjectionHead(nn.Module):
    """logits = tau * cos(f, t(P)) with P trainable; templates averaged before projecting (equal by linearity)."""

    pre_mean: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    logit_scale: torch.Tensor

    def __init__(self, pre: torch.Tensor, proj: torch.Tensor, logit_scale: float):
        super().__init__()
        self.register_buffer("pre_mean", pre.float().mean(dim=1))  # (C, W)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.text_projection = nn.Parameter(proj.detach().float().clone())  # (W, D)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(image_features.float(), self.pre_mean @ self.text_projection, self.logit_scale)


def tune_projection(
    pre: torch.Tensor,
    proj: torch.Tensor,
    logit_scale: float,
    train_views: torch.Tensor | TrainViews,
    train_labels: torch.Tensor,
    val_features: torch.Tensor | None,
    val_labels: torch.Tensor | None,
    config: EnhancedBaseConfig,
    seed: int,
    device: str = "cpu",
    quiet: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Tune P on the training views; return (P (W, D), info with the chosen lr and the search)."""
    has_val = val_features is not None and len(val_features) > 0
    lrs = config.lrs if config.search == "val" and has_val else (config.lr,)
    best: tuple[float, float, torch.Tensor] | None = None
    search = []
    for lr in lrs:
        head = ProjectionHead(pre, proj, logit_scale)
        fit(head, train_views, train_labels, config.optim(lr), seed=seed, device=device, quiet=quiet)
        head = head.cpu()
        acc = float("nan")
        if has_val:
            with torch.no_grad():
                acc = 100.0 * float((head(val_features).argmax(1) == val_labels).float().mean())
        search.append({"lr": lr, "val_accuracy": acc})
        if best is None or acc > best[0]:
            best = (acc, lr, head.text_projection.detach().clone())
    assert best is not None  # at least one learning rate was tried
    return best[2], {"enhanced_base_lr": best[1], "enhanced_base_search": search}


def enhanced_base(ctx: FitContext, config: EnhancedBaseConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(base (C, D), projection (W, D), info for metrics.json) for the context's backbone, classes and templates."""
    if ctx.backbone is None:
        raise TaskResValueError(
            "the enhanced base re-encodes the prompts and needs the backbone in the fit context.", param="backbone"
        )
    backbone = ctx.backbone
    pre = pre_projection_features(backbone, ctx.classnames, ctx.templates)
    original = projection(backbone.model).detach().float().cpu()
    if config.weights is not None:
        proj = load_projection(config.weights)
        if proj.shape != original.shape:
            raise TaskResValueError(
                f"base_weights file {config.weights!r} holds a ({proj.shape[0]}, {proj.shape[1]}) text projection, "
                f"but backbone {backbone.identity.spec!r} needs ({original.shape[0]}, {original.shape[1]}) (text "
                "width, embedding dim); use the file made for this backbone (strong_base files are for RN50).",
                param="base_weights",
            )
        info: dict[str, Any] = {"base_weights_sha256": hashlib.sha256(Path(config.weights).read_bytes()).hexdigest()}
    else:
        proj, info = tune_projection(
            pre,
            original,
            ctx.logit_scale,
            ctx.train_views,
            ctx.train_labels,
            ctx.val_features,
            ctx.val_labels,
            config,
            ctx.seed,
            ctx.device,
            ctx.quiet,
        )
    info["text_projection_change"] = float((proj - original).norm() / original.norm())
    return base_from_projection(pre, proj), proj, info
