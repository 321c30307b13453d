"""Linear probe, as CoOp's ``lpclip/linear_probe.py``: L2-regularised logistic regression on raw image features.

    logits = f W^T + b          f: un-normalised features of the test transform; W: (C, D), b: (C,)

scikit-learn's ``LogisticRegression(solver="lbfgs", max_iter=1000, C=c)`` with the default L2 penalty (lpclip passes
``penalty="l2"``, which scikit-learn >= 1.8 deprecates in favour of this default). C comes from the few-shot
validation split: the coarse grid ``[1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]`` (first best), then ``steps`` rounds that
compare the two ends of an interval and halve it in log10 towards the better end (ties go left), starting from
``[best / 10, best * 10]``; C is the better end of the last round. lpclip draws its own few-shot images with numpy;
here the probe sees the same images as every other method.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from taskres.errors import TaskResValueError, check_choice, invalid
from taskres.methods.base import FitContext, Fitted, Head, option
from taskres.methods.registry import Method, register_method, search_none, searches_on_val
from taskres.views import as_bank

logger = logging.getLogger(__name__)

COARSE_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass(frozen=True)
class LinearProbeConfig:
    # inverse L2 strength; None: search it on the few-shot validation split
    c: float | None = field(
        default=None, metadata=option("--lp-c", "fixed inverse regularisation C (with --search none)")
    )
    # "val": coarse grid + bisection on the few-shot val split; "none": use ``c``
    search: Literal["val", "none"] = field(
        default="val",
        metadata=option("--search", "select C on the few-shot validation split (val, the default) or not (none)"),
    )
    steps: int = 8  # lpclip's --num_step
    max_iter: int = 1000

    def __post_init__(self) -> None:
        check_choice("search", self.search, ("val", "none"))
        if self.search == "val" and self.c is not None:
            raise TaskResValueError(
                "`c` fixes the linear probe's C, which `search` val would search; set `search` none with it.", param="c"
            )
        if self.search == "none" and self.c is None:
            raise TaskResValueError(
                "`search` none needs a fixed C for the linear probe: set `c` (e.g. 1).", param="search"
            )
        if self.c is not None and not (self.c > 0 and math.isfinite(self.c)):
            raise invalid("c", "be a finite number > 0", self.c)
        if self.steps < 0:
            raise invalid("steps", "be >= 0 (bisection steps)", self.steps)


class LinearProbeHead(Head):
    class_rows = ("weight", "bias")
    config_cls = LinearProbeConfig
    nest_config = True
    scalars = ("c",)  # the C chosen
    weight: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, c: float, config: LinearProbeConfig):
        super().__init__()
        self.c, self.config = float(c), config
        self.register_buffer("weight", weight.detach().float().clone())  # (C, D)
        self.register_buffer("bias", bias.detach().float().clone())  # (C,)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features -> (N, C) logits (scikit-learn's decision function)."""
        return image_features.float() @ self.weight.t() + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias}


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, c: float, max_iter: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, D), b (C,)) of scikit-learn's logistic regression; classes absent from ``labels`` get bias -inf."""
    from sklearn.exceptions import ConvergenceWarning  # here: scikit-learn and scipy take seconds to import
    from sklearn.linear_model import LogisticRegression

    x, y = features.double().numpy(), labels.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # lpclip runs C = 1e6 at max_iter 1000 too
        clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(x, y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # scikit-learn keeps one row for two classes: logits [0, w.f + b]
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    bias = torch.full((num_classes,), -math.inf, dtype=torch.float64)
    rows = torch.as_tensor(clf.classes_, dtype=torch.long)
    weight[rows], bias[rows] = torch.from_numpy(coef), torch.from_numpy(intercept)
    return weight.float(), bias.float()


def search_c(fit_score, steps: int = 8) -> tuple[float, list[tuple[float, float]]]:
    """lpclip's search: ``fit_score(c)`` returns the validation accuracy of C = c. Returns (C, [(c, acc), ...])."""
    tried: list[tuple[float, float]] = []

    def score(c: float) -> float:
        acc = fit_score(c)
        tried.append((c, acc))
        return acc

    accs = [score(c) for c in COARSE_GRID]
    best = COARSE_GRID[int(np.argmax(accs))]
    left, right = best * 1e-1, best * 1e1
    chosen = best
    for _ in range(steps):
        acc_left, acc_right = score(left), score(right)
        mid = 10 ** (0.5 * (math.log10(left) + math.log10(right)))
        if acc_left < acc_right:
            chosen, left = right, mid
        else:
            chosen, right = left, mid
    return chosen, tried


def fit_linear_probe(ctx: FitContext, config: LinearProbeConfig) -> Fitted:
    bank = as_bank(ctx.train_views, 1)
    if bank.shape[0] != 1:
        raise TaskResValueError(
            "the linear probe trains on the test-transform features (lpclip); set `views` to 0.", param="views"
        )
    feats, labels = bank[0], ctx.train_labels  # (N, D), (N,)
    num_classes = ctx.base.shape[0]
    c: float | None = config.c
    info: dict[str, Any] = {}
    if config.search == "val":
        if not ctx.has_val:
            raise TaskResValueError(
                "the linear probe searches C on the few-shot validation split, and this dataset "
                "has none; set `search` none and a fixed `c` (e.g. 1).",
                param="search",
            )

        def val_accuracy(c: float) -> float:
            head = LinearProbeHead(*fit_logistic(feats, labels, num_classes, c, config.max_iter), c, config)
            return float((head(ctx.val_features).argmax(1) == ctx.val_labels).float().mean())

        c, tried = search_c(val_accuracy, config.steps)
        info["lp_search"] = [{"c": ci, "val_accuracy": 100.0 * a} for ci, a in tried]
    assert c is not None  # searched, or fixed (LinearProbeConfig: search none needs c)
    info["lp_c"] = c
    return Fitted(LinearProbeHead(*fit_logistic(feats, labels, num_classes, c, config.max_iter), c, config), info)


register_method(
    Method(
        "linear-probe",
        "Linear probe: logistic regression on raw image features, C searched on val (CoOp lpclip)",
        LinearProbeConfig,
        LinearProbeHead,
        fit_linear_probe,
        views=0,
        test_view_only=True,
        val_option=searches_on_val,
        no_val_options=search_none,
    )
)
