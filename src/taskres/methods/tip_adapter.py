"""Tip-Adapter (Zhang et al., ECCV 2022): zero-shot CLIP plus a key-value cache of the few-shot images, training-free.

    logits = s * f W^T + a * exp(-b * (1 - f K^T)) V
    f: (N, D) normalised image features;  W: (C, D) normalised base classifier;  s = exp(logit_scale)
    K: (NK, D) cache keys = each support image's raw features averaged over its augmented views, then normalised
    V: (NK, C) one-hot labels of the support images

With a = 0 the head is zero-shot CLIP. a and b are searched on the few-shot validation split over the official grid
(gaopengcuhk/Tip-Adapter ``utils.search_hp``): ``b_i = i * (scale_b - 0.1) / steps_b + 0.1`` for i < steps_b, the same
for a, b in the outer loop, first best kept. Initial values and search scales are the public per-dataset configs
(``configs/<dataset>.yaml``, RN50); ``search_step`` is [200, 20] in all of them. Tip-Adapter-F
(``tip_adapter_f.py``) trains K with this same head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from taskres.errors import TaskResValueError, check_choice
from taskres.methods.base import CosineHead, FitContext, Fitted, cosine_logits, option
from taskres.methods.registry import Method, OfficialVariant, register_method, search_none, searches_on_val
from taskres.views import TrainViews, as_bank

# Tip-Adapter's configs/<dataset>.yaml: (init_beta, init_alpha, search_scale [beta, alpha]), keyed by our names.
PUBLIC_CONFIGS = {
    "imagenet": (1.0, 1.17, (7.0, 3.0)),
    "caltech101": (1.0, 3.0, (12.0, 5.0)),
    "oxford_pets": (1.0, 1.17, (7.0, 3.0)),
    "stanford_cars": (1.0, 3.0, (20.0, 10.0)),
    "oxford_flowers": (1.0, 10.0, (50.0, 50.0)),
    "food101": (1.0, 1.17, (10.0, 10.0)),
    "fgvc_aircraft": (1.0, 5.0, (30.0, 30.0)),
    "sun397": (1.0, 1.17, (12.0, 10.0)),
    "dtd": (1.0, 2.0, (13.0, 13.0)),
    "eurosat": (1.0, 2.0, (12.0, 10.0)),
    "ucf101": (1.0, 3.0, (7.0, 3.0)),
}
# Our choice for datasets without a public config: the most common initial values and the Food101 grid (a and b up
# to 10), which spans most of the published grids.
GENERIC = (1.0, 1.17, (10.0, 10.0))


@dataclass(frozen=True)
class TipAdapterConfig:
    alpha: float | None = field(
        default=None, metadata=option("--tip-alpha", "fixed a (with --search none; default: the preset's initial a)")
    )
    beta: float | None = field(
        default=None, metadata=option("--tip-beta", "fixed b (with --search none; default: the preset's initial b)")
    )
    init_alpha: float = GENERIC[1]
    init_beta: float = GENERIC[0]
    search: Literal["val", "none"] = field(
        default="val",
        metadata=option(
            "--search",
            "select a and b (and Tip-Adapter-F's epoch) on the few-shot validation split (val, the default) "
            "or not (none)",
        ),
    )
    search_scale: tuple[float, float] = GENERIC[2]  # (b, a) upper ends of the grids
    search_step: tuple[int, int] = (200, 20)  # (b steps, a steps)
    preset: str = "generic"  # the public config the values come from

    def __post_init__(self) -> None:
        object.__setattr__(self, "search_scale", tuple(float(x) for x in self.search_scale))
        object.__setattr__(self, "search_step", tuple(int(x) for x in self.search_step))
        check_choice("search", self.search, ("val", "none"))
        if self.search == "val" and (self.alpha is not None or self.beta is not None):
            raise TaskResValueError(
                "`alpha`/`beta` fix Tip-Adapter's a and b, which `search` val would search; "
                "set `search` "
                "none with them.",
                param="alpha" if self.alpha is not None else "beta",
            )
        if (
            any(v is not None and not (v >= 0 and math.isfinite(v)) for v in (self.alpha, self.beta))
            or min(self.search_step) < 1
        ):
            raise TaskResValueError(
                f"`alpha` and `beta` must be finite and >= 0 and the search steps >= 1; got "
                f"a={self.alpha!r}, "
                f"b={self.beta!r}, steps={self.search_step!r}.",
                param="alpha",
            )

    @classmethod
    def for_dataset(cls, dataset: str, **overrides) -> TipAdapterConfig:
        """The public config of ``dataset`` (a benchmark name), or the generic one."""
        beta, alpha, scale = PUBLIC_CONFIGS.get(dataset, GENERIC)
        preset = dataset if dataset in PUBLIC_CONFIGS else "generic"
        return cls(init_alpha=alpha, init_beta=beta, search_scale=scale, preset=preset, **overrides)


class TipAdapterHead(CosineHead):
    class_columns = ("cache_values",)
    config_cls = TipAdapterConfig
    nest_config = True
    scalars = ("alpha", "beta", "logit_scale")  # a and b as chosen
    cache_values: torch.Tensor  # a buffer
    cache_keys: torch.Tensor  # a parameter (train_keys) or a buffer

    def __init__(
        self,
        base_text_features: torch.Tensor,
        cache_keys: torch.Tensor,
        cache_values: torch.Tensor,
        logit_scale: float,
        alpha: float,
        beta: float,
        train_keys: bool = False,
        config: TipAdapterConfig | None = None,
    ):
        super().__init__(base_text_features, logit_scale)
        self.config = config
        self.register_buffer("cache_values", cache_values.detach().float().clone())  # V: (NK, C)
        keys = cache_keys.detach().float().clone()  # K: (NK, D)
        if train_keys:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys)
        self.alpha, self.beta = float(alpha), float(beta)

    def affinity(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, NK): normalised features against the keys."""
        return F.normalize(image_features.float(), dim=-1) @ self.cache_keys.t()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) un-normalised image features -> (N, C) logits."""
        clip_logits = cosine_logits(image_features.float(), self.base_text_features, self.logit_scale)
        cache_logits = torch.exp(-(self.beta - self.beta * self.affinity(image_features))) @ self.cache_values
        return clip_logits + self.alpha * cache_logits

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "base_text_features": self.base_text_features,
            "cache_keys": self.cache_keys,
            "cache_values": self.cache_values,
        }


def build_cache(
    train_views: torch.Tensor | TrainViews, labels: torch.Tensor, num_classes: int, augment_epochs: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, N, D) raw features (or a view source: ``augment_epochs`` draws) -> keys (N, D): mean over views,
    normalised; values (N, C): one-hot labels."""
    keys = F.normalize(as_bank(train_views, augment_epochs).float().mean(dim=0), dim=-1)
    return keys, F.one_hot(labels, num_classes).float()


def grid(scale: float, steps: int) -> list[float]:
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


@torch.no_grad()
def search_alpha_beta(
    head: TipAdapterHead, features: torch.Tensor, labels: torch.Tensor, config: TipAdapterConfig
) -> tuple[float, float, float]:
    """(a, b, accuracy %) with the best accuracy on (features, labels); b outer, a inner, first best kept."""
    features, labels = features.to(head.cache_keys.device), labels.to(head.cache_keys.device)
    clip_logits = cosine_logits(features.float(), head.base_text_features, head.logit_scale)  # (M, C)
    affinity = head.affinity(features)  # (M, NK)
    alpha_list = grid(config.search_scale[1], config.search_step[1])
    best = (-1, 0.0, 0.0)
    for beta in grid(config.search_scale[0], config.search_step[0]):
        cache_logits = torch.exp(-(beta - beta * affinity)) @ head.cache_values  # (M, C)
        correct = [
            int(((clip_logits + alpha * cache_logits).argmax(dim=-1) == labels).sum())  # (M, C) at a time
            for alpha in alpha_list
        ]
        i = max(range(len(correct)), key=lambda j: (correct[j], -j))  # the first of the best a for this b
        if correct[i] > best[0]:
            best = (correct[i], alpha_list[i], beta)
    return best[1], best[2], 100.0 * best[0] / len(labels)


def require_val(ctx: FitContext) -> None:
    if not ctx.has_val:
        raise TaskResValueError(
            "Tip-Adapter searches a and b on the few-shot validation split, and this dataset has "
            "none; set `search` none (with fixed `alpha` and `beta`, or the initial values).",
            param="search",
        )


def choose_alpha_beta(head: TipAdapterHead, ctx: FitContext, config: TipAdapterConfig, info: dict) -> TipAdapterHead:
    """Set the head's a and b: searched on the few-shot val split, or the fixed/initial values; record them.

    Under the official protocol, searched as the public code does: on the test split for ImageNet, on the dataset's
    whole val split otherwise (docs/protocol.md#tip-adapter-protocol).
    """
    if ctx.protocol == "official":
        if config.search == "none" or config.alpha is not None or config.beta is not None:
            raise TaskResValueError(
                "`protocol` official searches a and b as the public code does; drop `search` "
                "none and the fixed `alpha`/`beta`.",
                param="protocol",
            )
        features, labels, split = public_search_split(ctx)
        head.alpha, head.beta, acc = search_alpha_beta(head, features, labels, config)
        info.update(tip_search_split=split, tip_search_accuracy=acc)
        if split == "test":
            info["test_selected"] = True
    elif config.search == "val":
        require_val(ctx)
        assert ctx.val_features is not None and ctx.val_labels is not None  # require_val
        head.alpha, head.beta, acc = search_alpha_beta(head, ctx.val_features, ctx.val_labels, config)
        info["tip_search_val_accuracy"] = acc
    else:
        head.alpha = config.init_alpha if config.alpha is None else config.alpha
        head.beta = config.init_beta if config.beta is None else config.beta
    info.update(tip_alpha=head.alpha, tip_beta=head.beta)
    return head


def public_search_split(ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(features, labels, split name) that Tip-Adapter's public code searches a and b on."""
    if ctx.dataset == "imagenet":
        if ctx.test_features is None:
            raise TaskResValueError(
                "the official Tip-Adapter protocol searches ImageNet's a and b on the test split, "
                "which the fit context lacks.",
                param="protocol",
            )
        assert ctx.test_labels is not None  # given with the test features
        return ctx.test_features, ctx.test_labels, "test"
    if ctx.full_val_features is None or not len(ctx.full_val_features):
        raise TaskResValueError(
            "the official Tip-Adapter protocol searches a and b on the dataset's whole val "
            "split, and this dataset has none; use the default `protocol`.",
            param="protocol",
        )
    assert ctx.full_val_labels is not None  # given with the val features
    return ctx.full_val_features, ctx.full_val_labels, "full_val"


def fit_tip_adapter(ctx: FitContext, config: TipAdapterConfig) -> Fitted:
    keys, values = build_cache(ctx.train_views, ctx.train_labels, ctx.base.shape[0])
    head = TipAdapterHead(ctx.base, keys, values, ctx.logit_scale, config.init_alpha, config.init_beta, config=config)
    info: dict = {}
    return Fitted(choose_alpha_beta(head, ctx, config, info), info)


# The public code: a cache from 10 augmented epochs at RandomResizedCrop(scale=(0.5, 1)), a text classifier with
# per-template normalisation, a and b searched on the whole val split (ImageNet: on test).
PUBLIC = OfficialVariant(views=10, view_scale=(0.5, 1.0), base="normalized_templates", selection="public")

register_method(
    Method(
        "tip-adapter",
        "Tip-Adapter: training-free key-value cache of the few-shot features (Zhang et al. 2022)",
        TipAdapterConfig,
        TipAdapterHead,
        fit_tip_adapter,
        config_preset=TipAdapterConfig.for_dataset,
        official=PUBLIC,
        views=10,
        val_option=searches_on_val,
        no_val_options=search_none,
    )
)  # the public cache: 10 augmented epochs
