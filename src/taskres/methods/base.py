"""What a method is and what it receives and returns.

A method sees features and the base classifier, never images or files (CoOp, which runs the text encoder in its
loop, gets the backbone explicitly). It is one module that defines

- a frozen **config** dataclass whose defaults are the published preset; a field that the user may set from the
  command line carries ``metadata=option("--flag", "help")``;
- a **head** (a :class:`Head`): ``(N, D)`` image features -> ``(N, C)`` logits, with ``export()`` /
  ``from_export()`` and ``select_classes()``;
- a **fit** function ``fit(ctx: FitContext, config) -> Fitted``;

and registers them with ``register_method(Method(...))`` (``taskres.methods.registry``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from taskres.backbones import Backbone
from taskres.engine import OptimConfig, autograd_step, fit
from taskres.views import TrainViews

if TYPE_CHECKING:
    from taskres.features import Features


def option(flag: str, help: str, **argparse_kwargs: Any) -> dict:
    """Field metadata that exposes a config field on the command line as ``flag`` (types and choices are read off
    the field's annotation by the CLI; ``argparse_kwargs`` such as ``metavar`` pass through)."""
    return {"flag": flag, "help": help, **argparse_kwargs}


def config_options(config_cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that carry an ``option(...)``."""
    return [f for f in dataclasses.fields(config_cls) if "flag" in f.metadata]


def cosine_logits(
    image_features: torch.Tensor, classifier: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """(N, D) x (C, D) -> (N, C): tau * cosine similarity; neither input needs to be normalised."""
    return logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(classifier, dim=-1).t()


def scaled_unit(image_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """tau * f / |f|, row by row: the image side of the cosine logits."""
    return logit_scale * F.normalize(image_features, dim=-1)


def column_cosine(
    z: torch.Tensor,
    classifier: torch.Tensor,
    residual: torch.Tensor | None = None,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The column-scaled cosine logits from the image side ``z = scaled_unit(f, tau)`` (N, D): z @ t^T / |t| with
    t = classifier (+ alpha * residual, for a fixed alpha), differentiated by hand (``_ColumnCosine``).

    ``cosine_logits`` with the classifier's norms applied to the (N, C) logits' columns instead of its (C, D) rows:
    the same value up to rounding, and the cheaper form to train, where every step changes t. Its backward costs
    one matrix product and one pass over t's (C, D) entries, where autograd through ``F.normalize`` takes about
    eight passes; alpha scales the (C,) factors, so the residual's gradient has no pass of its own
    (docs/performance.md).

    ``out``: a (C, D) tensor to form t in, reused step after step by a training loop instead of a fresh one each
    step. Autograd keeps it for the backward; forming the next t in it before that backward has run makes the
    backward fail (torch's in-place check), it never computes a wrong gradient."""
    return _ColumnCosine.apply(z, classifier, residual, alpha, out)


def column_cosine_cross_entropy(
    z: torch.Tensor,
    targets: torch.Tensor,
    classifier: torch.Tensor,
    residual: torch.Tensor | None = None,
    alpha: float = 1.0,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits): ``F.cross_entropy(column_cosine(z, classifier, residual, alpha, out), targets)`` and the
    logits, as one autograd node (``_ColumnCosineCE``); the logits carry no gradient."""
    loss, logits = _ColumnCosineCE.apply(z, classifier, residual, alpha, out, targets)
    return loss, logits


def _column_logits(ctx, z, base, residual, alpha, out) -> torch.Tensor:
    """The forward of the column-scaled cosine; saves what ``_column_grads`` needs."""
    t, clamped, live, logits = _column_forward(z, base, residual, alpha, out)
    ctx.save_for_backward(z, t, clamped, live, logits)
    ctx.alpha = alpha
    return logits


def _column_forward(z, base, residual, alpha, out):
    """t = base (+ alpha * residual, formed in ``out``), its clamped row norms, where they exceed the clamp, and
    the logits z @ t^T / clamped."""
    t = base if residual is None else torch.add(base, residual, alpha=alpha, out=out)
    norms = t.norm(dim=-1)  # (C,)
    clamped = norms.clamp_min(1e-12)
    logits = (z @ t.t()).div_(clamped)  # (N, C)
    return t, clamped, norms > 1e-12, logits


def _column_grads(ctx, grad: torch.Tensor, scale: torch.Tensor | float = 1.0):
    """The gradients of z, base and residual for the upstream gradient ``scale * grad`` (N, C)."""
    need_z, need_base, need_residual = ctx.needs_input_grad[:3]
    return _column_backward(ctx.saved_tensors, grad, scale, ctx.alpha, need_z, need_base, need_residual)


def _column_backward(saved, grad, scale, alpha, need_z, need_base, need_residual, out=None):
    """``_column_grads`` from the forward's (z, t, clamped, live, logits). The scalar ``scale``, and alpha when
    only the residual needs a gradient, are applied through the (C,) factors: no pass of their own over (N, C) or
    (C, D). ``out``: a (C, D) tensor to form the class side's gradient in."""
    z, t, clamped, live, logits = saved
    only_residual = need_residual and not (need_z or need_base)
    factor = scale * alpha if only_residual else scale
    plain = isinstance(factor, float) and factor == 1.0
    scaled = grad / clamped if plain else grad * (factor / clamped)  # (N, C)
    grad_z = scaled @ t if need_z else None
    grad_base = grad_residual = None
    if need_base or need_residual:
        dots = (grad * logits).sum(dim=0)
        coef = -dots / (clamped * clamped) if plain else dots * (-factor / (clamped * clamped))
        grad_t = torch.mm(scaled.t(), z, out=out).addcmul_(t, torch.where(live, coef, 0.0)[:, None])
        if only_residual:
            grad_residual = grad_t
        else:
            grad_base = grad_t if need_base else None
            grad_residual = grad_t * alpha if need_residual else None
    return grad_z, grad_base, grad_residual


def _cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean cross-entropy as ``F.cross_entropy`` computes it, the log-probabilities)."""
    log_probs = torch.log_softmax(logits, dim=1)
    return F.nll_loss(log_probs, targets), log_probs


def _cross_entropy_grad(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """softmax - one-hot, formed in place of ``log_probs`` (not needed again): the summed loss's gradient."""
    grad = log_probs.exp_()
    grad[torch.arange(len(grad), device=grad.device), targets] -= 1.0
    return grad


class _ColumnCosine(torch.autograd.Function):
    """(N, D) scaled unit image features z and the classifier t = base (+ alpha * residual), (C, D) ->
    z @ t^T / max(|t|, eps), with a hand-written backward: dL/dz = (G / n) @ t;
    dL/dt = (G / n)^T @ z - t * sum_n(G * logits) / n^2 (zero where |t| <= eps, as F.normalize's clamp);
    dL/dresidual = alpha * dL/dt."""

    @staticmethod
    def forward(ctx, z, base, residual, alpha, out=None):
        return _column_logits(ctx, z, base, residual, alpha, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (*_column_grads(ctx, grad), None, None)


class _ColumnCosineCE(torch.autograd.Function):
    """``_ColumnCosine`` followed by the mean cross-entropy over ``targets``, in one node: returns the loss (as
    ``F.cross_entropy``) and the logits (not differentiable). Its backward forms the logits' gradient
    (softmax - one-hot) / N in one pass where autograd through ``F.cross_entropy`` takes four."""

    @staticmethod
    def forward(ctx, z, base, residual, alpha, out, targets):
        logits = _column_logits(ctx, z, base, residual, alpha, out)
        loss, ctx.log_probs = _cross_entropy_forward(logits, targets)
        ctx.targets = targets
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_logits):
        grad = _cross_entropy_grad(ctx.log_probs, ctx.targets)
        ctx.log_probs = ctx.targets = None
        return (*_column_grads(ctx, grad, grad_loss / len(grad)), None, None, None)


def column_cosine_residual_step(
    z: torch.Tensor,
    targets: torch.Tensor,
    classifier: torch.Tensor,
    residual: torch.Tensor,
    alpha: float,
    t_out: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits, the residual's gradient) without autograd: the values that ``column_cosine_cross_entropy``
    and a backward from its loss give when only the residual trains, bit for bit (the same operations in the same
    order). ``t_out`` / ``grad_out``: (C, D) tensors to form t and the gradient in, reused step after step; the
    gradient is ``grad_out`` itself when given."""
    with torch.no_grad():
        saved = _column_forward(z, classifier, residual, alpha, t_out)
        loss, log_probs = _cross_entropy_forward(saved[-1], targets)
        grad = _cross_entropy_grad(log_probs, targets)
        scale = torch.ones((), dtype=loss.dtype, device=loss.device) / len(grad)  # autograd's d(mean)/d(sum)
        grad_residual = _column_backward((z, *saved), grad, scale, alpha, False, False, True, out=grad_out)[2]
    return loss, saved[-1], grad_residual


class Head(nn.Module):
    """A tuned classifier over cached image features: ``forward`` maps (N, D) un-normalised features to (N, C).

    Saved as ``classifier.safetensors``: ``export()`` gives the tensors (float32, CPU) and a JSON-able metadata dict;
    ``from_export`` rebuilds the head. ``class_rows`` / ``class_columns`` name the exported tensors indexed by class
    on dim 0 / dim 1, which is all ``select_classes`` needs; ``frozen_tensors`` name those that training never
    changes (the contract test checks it).
    """

    class_rows: ClassVar[tuple[str, ...]] = ()
    class_columns: ClassVar[tuple[str, ...]] = ()
    frozen_tensors: ClassVar[tuple[str, ...]] = ()

    def train_inputs(self, image_features: torch.Tensor) -> torch.Tensor:
        """What ``train_logits`` takes, row by row: the part of the training logits that depends on the image
        features alone and that training does not change. The engine applies it once per run to a bank of cached
        views (``engine.fit``), so that no step repeats it. Default: the features themselves."""
        return image_features

    def train_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The logits that training steps differentiate, from a batch of ``train_inputs``: ``forward``'s, in
        whatever form trains fastest."""
        return self(inputs)

    def train_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A training step's (loss, logits) for a batch of ``train_inputs``: the mean cross-entropy of
        ``train_logits`` against ``targets``, and those logits."""
        logits = self.train_logits(inputs)
        return F.cross_entropy(logits, targets), logits

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's forward and backward: ``train_loss``'s (loss, logits), detached, with the gradients
        of the trainable parameters left in their ``.grad`` (the engine clears them before each step). Default:
        autograd through ``train_loss``; a head may compute its gradients in closed form instead."""
        return autograd_step(self.train_loss, inputs, targets)

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def metadata(self) -> dict:
        raise NotImplementedError

    def export(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {k: v.detach().float().contiguous().cpu() for k, v in self.tensors().items()}, self.metadata()

    @classmethod
    def from_export(cls, tensors: dict[str, torch.Tensor], meta: dict) -> Head:
        raise NotImplementedError

    def select_classes(self, rows: Sequence[int]) -> Head:
        """A head over a subset of classes (in the given order), e.g. ImageNet-A's 200 of ImageNet's 1000."""
        tensors, meta = self.export()
        rows = list(rows)
        for name in self.class_rows:
            tensors[name] = tensors[name][rows]
        for name in self.class_columns:
            tensors[name] = tensors[name][:, rows]
        return type(self).from_export(tensors, meta)


class CosineHead(Head):
    """The frozen base classifier t (C, D) and CLIP's logit scale tau: logits = tau * cos(image side, class side).
    Subclasses change the class side (``classifier``) or the image side (``image_features``)."""

    class_rows: ClassVar[tuple[str, ...]] = ("base_text_features",)
    frozen_tensors: ClassVar[tuple[str, ...]] = ("base_text_features",)
    base_text_features: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    logit_scale: torch.Tensor

    def __init__(self, base_text_features: torch.Tensor, logit_scale: float):
        super().__init__()
        self.register_buffer("base_text_features", base_text_features.detach().float().clone())  # (C, D)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def classifier(self) -> torch.Tensor:
        return self.base_text_features  # (C, D)

    def image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return image_features.float()  # (N, D)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, D) un-normalised image features -> (N, C) logits."""
        return cosine_logits(self.image_features(image_features), self.classifier(), self.logit_scale)

    def column_form(self) -> bool:
        """Whether training uses the column-scaled form of ``forward`` (a subclass with its own ``forward`` trains
        through that)."""
        return type(self).forward is CosineHead.forward

    def image_side_trains(self) -> bool:
        """Whether training changes the image side tau * f / |f| (a subclass whose ``image_features`` holds
        trainable parameters says so); if not, ``train_inputs`` is that image side."""
        return type(self).image_features is not CosineHead.image_features

    def train_inputs(self, image_features: torch.Tensor) -> torch.Tensor:
        if not self.column_form() or self.image_side_trains():
            return image_features
        return scaled_unit(self.image_features(image_features), self.logit_scale)

    def train_z(self, inputs: torch.Tensor) -> torch.Tensor:
        """The image side tau * f / |f| of a batch of ``train_inputs`` (column form)."""
        if self.image_side_trains():
            return scaled_unit(self.image_features(inputs), self.logit_scale)
        return inputs

    def train_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The same logits in the column-scaled form (``column_cosine``), cheaper to train through."""
        if not self.column_form():
            return self(inputs)
        return column_cosine(self.train_z(inputs), self.classifier())


@dataclass
class FitContext:
    """What a method's fit receives: the run's features (``taskres.features.Features``) and its settings."""

    base: torch.Tensor  # (C, D) base classifier: mean un-normalised text embedding over templates
    logit_scale: float  # tau = exp(logit_scale) of the backbone
    # the training views (see taskres.views) with their (N,) labels, the few-shot val split, the test split
    features: Features
    optim: OptimConfig | None  # None for training-free methods
    seed: int
    classnames: Sequence[str] = ()
    templates: Sequence[str] = ()
    shots: int = 0
    dataset: str = ""
    backbone: Backbone | None = None  # for methods with the text encoder in the loop
    device: str = "cpu"
    quiet: bool = False
    on_epoch: Callable[[dict], None] | None = None
    # protocol "official": the method runs as its public code (Method.official); with ``public_selection`` (its
    # public code selects on other splits) the fit is shown the test split and the dataset's whole val split
    protocol: str = "default"
    public_selection: bool = False

    @property
    def train_views(self) -> torch.Tensor | TrainViews:
        """The few-shot images' features per epoch: a (V, N, D) tensor or ViewBank of cached views (V = 1: the
        test transform), or OnlineViews (fresh augmentations, encoded each epoch)."""
        return self.features.train_views

    @property
    def train_labels(self) -> torch.Tensor:
        return self.features.train_labels  # (N,)

    @property
    def val_features(self) -> torch.Tensor | None:
        return self.features.val  # (M, D) few-shot validation features (test transform), or None

    @property
    def val_labels(self) -> torch.Tensor | None:
        return self.features.val_labels  # (M,)

    @property
    def test_features(self) -> torch.Tensor | None:
        return self.features.test if self.public_selection else None  # (T, D)

    @property
    def test_labels(self) -> torch.Tensor | None:
        return self.features.test_labels if self.public_selection else None

    @property
    def full_val_features(self) -> torch.Tensor | None:
        return self.features.full_val if self.public_selection else None  # (M, D) the dataset's whole val split

    @property
    def full_val_labels(self) -> torch.Tensor | None:
        return self.features.full_val_labels if self.public_selection else None

    @property
    def has_val(self) -> bool:
        return self.val_features is not None and len(self.val_features) > 0

    def train(
        self, module: nn.Module, optim: OptimConfig | None = None, on_epoch: Callable[[dict], None] | None = None
    ) -> list[dict]:
        """Train ``module``'s parameters on the training views with the run's optimiser, seed and device."""
        config = optim or self.optim
        assert config is not None, "a trained method's fit context has an optimiser"
        return fit(
            module,
            self.train_views,
            self.train_labels,
            config,
            seed=self.seed,
            device=self.device,
            on_epoch=on_epoch or self.on_epoch,
            quiet=self.quiet,
        )


@dataclass(frozen=True)
class Artifact:
    """A file a method adds to the run folder; ``metrics_key`` records its path in metrics.json."""

    filename: str
    write: Callable[[Path], None]
    metrics_key: str | None = None


@dataclass
class Fitted:
    """What a method's fit returns: the trained head, values for metrics.json (``info``), heads to evaluate on the
    test split beside it (``f"{name}_accuracy"`` in metrics.json), and files for the run folder."""

    head: Head
    info: dict[str, Any] = field(default_factory=dict)
    extra_heads: dict[str, Head] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
