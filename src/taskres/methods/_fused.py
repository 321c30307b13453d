"""The column-scaled cosine and its hand-written gradients: how the cosine heads train fast (docs/performance.md).

Evaluation computes ``tau * cos(f, t)`` as written (``taskres.methods.base.cosine_logits``); training differentiates
the same logits in a cheaper form, with the class norms applied to the (N, C) logits' columns:

    logits = z @ t^T / |t|          z = tau * f / |f| (N, D), fixed while t (C, D) trains

``column_cosine`` is that form as one autograd node, ``column_cosine_cross_entropy`` adds the mean cross-entropy to
the node, and ``column_cosine_residual_step`` is the whole step without autograd when only a residual x of
t = base + alpha * x trains (TaskRes). ``ResidualTraining`` gives a head with such a residual these steps.
Every form is checked against autograd through ``F.normalize`` (tests/test_fused.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # at run time the mixin's base is object: taskres.methods.base imports this module
    from taskres.methods.base import CosineHead as _CosineHead
else:
    _CosineHead = object

_Head = TypeVar("_Head", bound="ResidualTraining")


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


class ResidualTraining(_CosineHead):
    """Training steps for a cosine head whose class side is t = base + alpha * x with a fixed alpha, listed before
    ``CosineHead`` in the head's bases: the logits and the loss in one node (``column_cosine_cross_entropy``), and
    when x alone trains, its gradient in closed form (``column_cosine_residual_step``). The head says, through
    ``fixed_residual``, whether its residual and alpha take that form (None: the plain ``CosineHead`` steps)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffers_in_training: dict[str, torch.Tensor] = {}

    def fixed_residual(self) -> tuple[torch.Tensor, float] | None:
        """(x (C, D), alpha) of the class side base + alpha * x when alpha is fixed, else None."""
        raise NotImplementedError

    def train_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """t + alpha * x formed and differentiated inside the column-scaled cosine (``column_cosine``)."""
        residual = self.fixed_residual()
        if residual is None:
            return super().train_logits(inputs)
        x, alpha = residual
        base = self.base_text_features
        return column_cosine(self.train_z(inputs), base, x, alpha, out=self._scratch("t", base))

    def train_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the cross-entropy in one node (``column_cosine_cross_entropy``)."""
        residual = self.fixed_residual()
        if residual is None:
            return super().train_loss(inputs, targets)
        x, alpha = residual
        base = self.base_text_features
        return column_cosine_cross_entropy(self.train_z(inputs), targets, base, x, alpha, out=self._scratch("t", base))

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """When the residual alone trains (no trained image side), its gradient in closed form
        (``column_cosine_residual_step``): the same values as autograd, without its per-step overhead. The step sets
        ``x.grad`` to a tensor that the next step reuses, and runs no autograd hooks; where ``x.grad`` already holds
        a gradient (to add to) or ``x``'s dtype is not the base's, it goes through autograd (``Head.train_step``)."""
        residual = self.fixed_residual()
        base = self.base_text_features
        if residual is None or self.image_side_trains() or not residual[0].requires_grad:
            return super().train_step(inputs, targets)
        x, alpha = residual
        if x.grad is not None or x.dtype != base.dtype:
            return super().train_step(inputs, targets)
        loss, logits, x.grad = column_cosine_residual_step(
            self.train_z(inputs),
            targets,
            base,
            x,
            alpha,
            t_out=self._scratch("t", base),
            grad_out=self._scratch("grad", x),  # x's own layout: the optimiser pairs .grad with x element by element
        )
        return loss, logits

    def _scratch(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A tensor laid out as ``like`` that training forms t + alpha * x ("t") or x's gradient ("grad") in, step
        after step (no fresh tensor a step)."""
        buffer = self._buffers_in_training.get(name)
        layout = (like.shape, like.stride(), like.dtype, like.device)
        if buffer is None or (buffer.shape, buffer.stride(), buffer.dtype, buffer.device) != layout:
            buffer = self._buffers_in_training[name] = torch.empty_like(like)
        return buffer

    def train(self: _Head, mode: bool = True) -> _Head:
        if not mode:
            self._buffers_in_training = {}  # training's scratch tensors, not kept beyond it
        return super().train(mode)
