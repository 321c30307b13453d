"""LP++ (Huang et al., CVPR 2024), as FereshteShakeri/FewShot-CLIP-Strong-Baseline ``methods/linear_probe_p2.py``:
a linear probe blended with the text classifier, class-wise,

    logits = f W^T + b + alpha ⊙ (f T^T)
    f: (N, D) L2-normalised image features;  T: (C, D) L2-normalised base classifier (frozen)
    W: (C, D), b: (C,), alpha: (C,)

trained full-batch with step sizes derived from the data, no hyper-parameter search:

- W starts at the per-class **sum** of the normalised support features (the public ``compute_centroids`` leaves the
  division by the count commented out), b at ``nn.Linear``'s default (uniform in +-1/sqrt(D), drawn here from the
  run's seed), alpha at ``250 * mean_c mean_{i in c} f_i . t_c`` (``calculate_init_alpha``).
- W and b: SGD, momentum 0.9, no weight decay, constant step ``4 N / lambda_max(F^T F)`` (``calculate_lr_w``,
  F the (N, D) normalised support features).
- alpha: a plain gradient step ``N / (4 max_c sum_i (f_i . t_c)^2)`` (``calculate_lr_alpha``) every 10th epoch.
  The public code never zeroes alpha's gradient, so each step uses the sum of alpha's gradients of every epoch so
  far; we do the same.
- One epoch = one full-batch forward on the current (W, b, alpha), the W/b step, then (every 10th epoch) the alpha
  step. 300 epochs (``configs/base.yaml`` ``train_epoch``).
- Selection: after every epoch the accuracy on the few-shot validation split; the last epoch with the best accuracy
  (``>=``) is kept. ``search="none"`` keeps the last epoch.

Why not ``ctx.train``: the engine trains with one optimiser over mini-batches and a preset learning rate; LP++ runs
full-batch with two data-derived step sizes, a separate alpha step every 10 epochs and a per-epoch selection on
val, so the loop is here (deterministic given the features; b drawn from ``ctx.seed``).

Training set: the public code encodes one augmented view of each support image (``train_epoch`` passes over those
fixed features). With the default ``views=1`` this is the same; with more cached views every view is a training row
(V * N rows) and W starts at the per-class sum over images (the sum over rows divided by V).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from taskres.errors import TaskResValueError, check_choice, invalid
from taskres.methods.base import FitContext, Fitted, Head, option
from taskres.methods.registry import Method, register_method, search_none, searches_on_val
from taskres.views import as_bank

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LPPConfig:
    epochs: int = 300  # configs/base.yaml train_epoch
    alpha_every: int = 10  # alpha steps after every 10th epoch
    alpha_init_scale: float = 250.0  # calculate_init_alpha: 250 / shots * (shots * mean similarity)
    momentum: float = 0.9  # the SGD of W and b
    search: Literal["val", "none"] = field(
        default="val",
        metadata=option(
            "--search",
            "keep the epoch with the best few-shot validation accuracy (val, the default, as LP++'s code) "
            "or the last epoch (none)",
        ),
    )

    def __post_init__(self) -> None:
        check_choice("search", self.search, ("val", "none"))
        if self.epochs < 1:
            raise invalid("epochs", "be >= 1", self.epochs)
        if self.alpha_every < 1:
            raise invalid("alpha_every", "be >= 1", self.alpha_every)
        if not 0 <= self.momentum < 1:
            raise invalid("momentum", "be in [0, 1)", self.momentum)


class LPPHead(Head):
    class_rows = ("weight", "bias", "alpha", "base_text_features")
    frozen_tensors = ("base_text_features",)
    config_cls = LPPConfig
    nest_config = True
    weight: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    bias: torch.Tensor
    alpha: torch.Tensor
    base_text_features: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        alpha: torch.Tensor,
        base_text_features: torch.Tensor,
        config: LPPConfig = LPPConfig(),
    ):
        super().__init__()
        self.config = config
        self.register_buffer("weight", weight.detach().float().clone())  # W: (C, D)
        self.register_buffer("bias", bias.detach().float().clone())  # b: (C,)
        self.register_buffer("alpha", alpha.detach().float().clone())  # alpha: (C,)
        self.register_buffer("base_text_features", base_text_features.detach().float().clone())  # t: (C, D)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) un-normalised image features -> (N, C) logits."""
        return lpp_logits(
            F.normalize(image_features.float(), dim=-1),
            self.weight,
            self.bias,
            self.alpha,
            F.normalize(self.base_text_features, dim=-1),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.weight,
            "bias": self.bias,
            "alpha": self.alpha,
            "base_text_features": self.base_text_features,
        }


def lpp_logits(
    f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """f (N, D), text (C, D), both normalised -> (N, C): f W^T + b + alpha ⊙ (f T^T)."""
    return f @ weight.t() + bias + alpha * (f @ text.t())


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D): the sum of each class's rows (LP++'s W initialisation)."""
    return torch.zeros(num_classes, features.shape[1], dtype=features.dtype).index_add_(0, labels, features)


def step_size_w(features: torch.Tensor) -> float:
    """``4 N / lambda_max(F^T F)`` for (N, D) normalised features F (``calculate_lr_w``)."""
    f = features.double()
    return 4 * f.shape[0] / float(torch.linalg.eigvalsh(f.t() @ f).max())


def step_size_alpha(features: torch.Tensor, text: torch.Tensor) -> float:
    """``N / (4 max_c sum_i (f_i . t_c)^2)`` for normalised features (N, D) and text (C, D) (``calculate_lr_alpha``)."""
    s = features.double() @ text.double().t()  # (N, C)
    return features.shape[0] / (4 * float((s**2).sum(dim=0).max()))


def initial_alpha(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float = 250.0) -> float:
    """``scale * mean_c mean_{i in c} f_i . t_c`` (``calculate_init_alpha``; classes without rows are skipped)."""
    s = features.double() @ text.double().t()  # (N, C)
    own = s[torch.arange(len(labels)), labels]  # (N,) similarity to the own class
    num_classes = text.shape[0]
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, own)
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    return scale * float((sums[present] / counts[present]).mean())


def training_rows(ctx: FitContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(every cached view of every support image as a normalised row (V * N, D), its label (V * N,), the normalised
    base T (C, D), V)."""
    bank = as_bank(ctx.train_views, 1).float()  # (V, N, D)
    features = F.normalize(bank.reshape(-1, bank.shape[-1]), dim=-1)  # (V * N, D) rows
    return features, ctx.train_labels.repeat(bank.shape[0]), F.normalize(ctx.base.float(), dim=-1), bank.shape[0]


@dataclass(eq=False)
class LPPProbe:
    """W, b and alpha while they train, with their step sizes: the public code's update order, one epoch at a time."""

    weight: torch.Tensor  # W: (C, D)
    bias: torch.Tensor  # b: (C,)
    alpha_init: float  # every class's alpha at the start
    lr_w: float
    lr_alpha: float
    momentum: float

    def __post_init__(self) -> None:
        self.weight.requires_grad_(True)
        self.bias.requires_grad_(True)
        self.alpha = torch.full(self.bias.shape, self.alpha_init, device=self.bias.device, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.weight, self.bias], lr=self.lr_w, momentum=self.momentum)
        self.alpha_grad_sum = torch.zeros_like(self.alpha)

    def logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return lpp_logits(features, self.weight, self.bias, self.alpha, text)

    def epoch(
        self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, alpha_step: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One full-batch forward, the W/b step and (``alpha_step``) alpha's: (loss, logits)."""
        logits = self.logits(features, text)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.alpha.grad = None
        loss.backward()
        self.optimizer.step()
        assert self.alpha.grad is not None  # alpha requires grad and the loss depends on it
        self.alpha_grad_sum += self.alpha.grad  # never reset, as in the public code
        if alpha_step:
            with torch.no_grad():
                self.alpha -= self.lr_alpha * self.alpha_grad_sum
        return loss, logits

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.weight, self.bias, self.alpha))

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weight.detach().clone(), self.bias.detach().clone(), self.alpha.detach().clone()


def initial_probe(
    ctx: FitContext, config: LPPConfig, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, num_views: int
) -> LPPProbe:
    """W at the per-image class sums, b at nn.Linear's default drawn from the run's seed, alpha and the step sizes
    from the data; on the run's device."""
    num_classes, dim = ctx.base.shape
    lr_w, lr_alpha = step_size_w(features), step_size_alpha(features, text)
    alpha0 = initial_alpha(features, labels, text, config.alpha_init_scale)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default bias, drawn from the run's seed only
        torch.manual_seed(ctx.seed)
        bias0 = nn.Linear(dim, num_classes).bias.detach().clone()
    weight = (class_sums(features.cpu(), labels.cpu(), num_classes) / num_views).to(ctx.device)
    return LPPProbe(weight, bias0.to(ctx.device), alpha0, lr_w, lr_alpha, config.momentum)


Best = tuple[float | None, int, torch.Tensor, torch.Tensor, torch.Tensor]  # (val accuracy, epoch, W, b, alpha)


def train_lpp(
    ctx: FitContext,
    config: LPPConfig,
    probe: LPPProbe,
    features: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
) -> Best:
    """``config.epochs`` full-batch epochs; returns the last epoch with the best few-shot validation accuracy
    (``search`` val), else the last epoch."""
    features, labels, text = features.to(ctx.device), labels.to(ctx.device), text.to(ctx.device)
    if config.search == "val":
        assert ctx.val_features is not None and ctx.val_labels is not None  # checked by fit_lpp
        val_f, val_y = F.normalize(ctx.val_features.float(), dim=-1).to(ctx.device), ctx.val_labels.to(ctx.device)
    best: Best | None = None
    best_acc = -math.inf
    for epoch in range(config.epochs):
        loss, logits = probe.epoch(features, labels, text, alpha_step=(epoch + 1) % config.alpha_every == 0)
        record = {
            "epoch": epoch,
            "lr": probe.lr_w,
            "loss": loss.item(),
            "train_accuracy": 100.0 * float((logits.argmax(1) == labels).float().mean()),
        }
        if not math.isfinite(record["loss"]) or not probe.finite():
            raise TaskResValueError(
                f"LP++ diverged in epoch {epoch + 1}: the loss or the parameters became non-finite.", param="method"
            )
        if config.search == "val":
            with torch.no_grad():
                acc = 100.0 * float((probe.logits(val_f, text).argmax(1) == val_y).float().mean())
            record["val_accuracy"] = acc
            if best is None or acc >= best_acc:
                best_acc, best = acc, (acc, epoch, *probe.snapshot())
        if ctx.on_epoch is not None:
            ctx.on_epoch(record)
    if best is None:
        best = (None, config.epochs - 1, probe.weight.detach(), probe.bias.detach(), probe.alpha.detach())
    return best


def fit_lpp(ctx: FitContext, config: LPPConfig) -> Fitted:
    features, labels, text, num_views = training_rows(ctx)
    if config.search == "val" and not ctx.has_val:
        raise TaskResValueError(
            "LP++ keeps the epoch with the best few-shot validation accuracy, and this dataset "
            "has none; set `search` none (the last epoch).",
            param="search",
        )
    probe = initial_probe(ctx, config, features, labels, text, num_views)
    acc, chosen, w, b, a = train_lpp(ctx, config, probe, features, labels, text)
    info = {
        "lpp_lr_w": probe.lr_w,
        "lpp_lr_alpha": probe.lr_alpha,
        "lpp_alpha_init": probe.alpha_init,
        "lpp_epoch": chosen,
        "lpp_alpha_mean": float(a.mean()),
    }
    if acc is not None:
        info["lpp_val_accuracy"] = acc
    logger.info(
        "LP++: step sizes W/b %.4g, alpha %.4g; alpha from %.4g; kept epoch %d",
        probe.lr_w,
        probe.lr_alpha,
        probe.alpha_init,
        chosen + 1,
    )
    return Fitted(LPPHead(w.cpu(), b.cpu(), a.cpu(), ctx.base, config), info)


register_method(
    Method(
        "lp++",
        "LP++: linear probe plus class-wise scaled text logits, f W^T + b + alpha * f T^T, full-batch with "
        "data-derived step sizes (Huang et al. 2024)",
        LPPConfig,
        LPPHead,
        fit_lpp,
        views=1,
        val_option=searches_on_val,
        no_val_options=search_none,
    )
)
