"""Mutation tests of the training-speed code (issue 16): the fused optimiser choice, the view bank mapped once, the
head's own training loss and the epoch totals in fit, the column-scaled cosine's defaults and hand-written backward,
and ViewBank.epoch on a non-contiguous bank. Each is checked against torch's own optimiser, autograd in float64 or
a sum written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskres import engine
from taskres.engine import OptimConfig, fit, make_optimizer, prepare_views
from taskres.methods.base import Head, column_cosine, column_cosine_cross_entropy
from taskres.methods.taskres import TaskResConfig, TaskResHead
from taskres.views import ViewBank


def _steps(opt: torch.optim.Optimizer, p: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach().clone()


@pytest.mark.parametrize(
    ("name", "cls", "kwargs"),
    [
        ("adam", torch.optim.Adam, {"eps": 1e-8}),
        ("adamw", torch.optim.AdamW, {"eps": 1e-8}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9}),
    ],
)
def test_float_cpu_parameters_step_as_torchs_fused_optimiser(name, cls, kwargs):
    """Float parameters on the CPU are updated by torch's fused kernel: the same values to the last bit as
    ``fused=True`` (the per-tensor loop rounds Adam's last bit differently)."""
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(48, 33, generator=g)
    grads = [torch.randn(48, 33, generator=g) for _ in range(6)]
    config = OptimConfig(optimizer=name, lr=1e-2, weight_decay=5e-4)
    p = p0.clone().requires_grad_()
    ours = _steps(make_optimizer([p], config), p, grads)
    q = p0.clone().requires_grad_()
    reference = _steps(cls([q], lr=1e-2, weight_decay=5e-4, fused=True, **kwargs), q, grads)
    assert torch.equal(ours, reference)
    if name != "sgd":  # the unfused loop differs in the last bit here, so the check above can tell them apart
        r = p0.clone().requires_grad_()
        assert not torch.equal(ours, _steps(cls([r], lr=1e-2, weight_decay=5e-4, **kwargs), r, grads))


def test_parameters_torch_cannot_fuse_get_the_per_tensor_update():
    """A parameter the fused kernel refuses (complex) still trains: the per-tensor update, as torch's default."""
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(16, dtype=torch.complex64, generator=g)
    grads = [torch.randn(16, dtype=torch.complex64, generator=g) for _ in range(3)]
    config = OptimConfig(lr=1e-2, weight_decay=5e-4)
    p = p0.clone().requires_grad_()
    ours = _steps(make_optimizer([p], config), p, grads)
    q = p0.clone().requires_grad_()
    reference = _steps(torch.optim.Adam([q], lr=1e-2, eps=1e-8, weight_decay=5e-4), q, grads)
    assert torch.equal(ours, reference)


def _third(x: torch.Tensor) -> torch.Tensor:
    return (x / 3) @ torch.arange(12, dtype=x.dtype).reshape(4, 3)  # (N, 4) -> (N, 3), keeps the dtype


def test_prepare_views_maps_a_bank_up_to_the_byte_limit(monkeypatch):
    """A bank of at most PREPARED_BANK_MAX_BYTES is mapped once, view by view, keeping the map's shape and dtype
    (float64 here: no rounding to float32); one byte more and it is left to the per-batch map (None)."""
    views = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bank = ViewBank(views, seed=7)
    size = views.numel() * views.element_size()
    monkeypatch.setattr(engine, "PREPARED_BANK_MAX_BYTES", size)
    prepared = prepare_views(bank, _third, "cpu")
    assert isinstance(prepared, ViewBank)
    assert prepared.seed == 7
    assert prepared.views.dtype == torch.float64
    assert torch.equal(prepared.views, torch.stack([_third(v) for v in views]))
    monkeypatch.setattr(engine, "PREPARED_BANK_MAX_BYTES", size - 1)
    assert prepare_views(bank, _third, "cpu") is None


def test_prepare_views_of_a_bank_without_views_is_none():
    assert prepare_views(ViewBank(torch.zeros(0, 5, 4), seed=0), _third, "cpu") is None


class _Probe(Head):
    """A linear head with the Head defaults: train_inputs, train_logits (its forward) and train_loss."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class _SmoothedProbe(_Probe):
    """Its own training loss (label smoothing), recording each step's loss and batch size."""

    def __init__(self, dim: int, classes: int):
        super().__init__(dim, classes)
        self.steps: list[tuple[float, int]] = []

    def train_loss(self, inputs, targets):
        logits = self.train_logits(inputs)
        loss = F.cross_entropy(logits, targets, label_smoothing=0.3)
        self.steps.append((float(loss.detach()), len(targets)))
        return loss, logits


def test_fit_trains_with_the_heads_own_loss_and_logs_its_exact_mean():
    """fit differentiates the head's train_loss (not a cross-entropy of its forward), and the epoch's logged loss
    is the mean over the samples of every step's loss, summed without float32 rounding."""
    g = torch.Generator().manual_seed(4)
    feats, labels = torch.randn(23, 6, generator=g) * 4, torch.randint(0, 3, (23,), generator=g)
    torch.manual_seed(0)
    head = _SmoothedProbe(6, 3)
    config = OptimConfig(lr=5e-2, epochs=2, batch_size=2, warmup_epochs=0, drop_last="never")
    history = fit(head, feats, labels, config, seed=0, quiet=True)
    assert len(head.steps) == 2 * 12
    for epoch, record in enumerate(history):
        steps = head.steps[12 * epoch : 12 * (epoch + 1)]
        expected = math.fsum(loss * size for loss, size in steps) / 23
        assert record["loss"] == pytest.approx(expected, rel=1e-13, abs=0)


def test_fit_trains_a_head_with_the_default_training_loss():
    """A Head that keeps the defaults trains on the cross-entropy of its forward (train_logits = forward)."""
    g = torch.Generator().manual_seed(5)
    feats, labels = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    torch.manual_seed(0)
    head = _Probe(6, 3)
    before = F.cross_entropy(head(feats), labels).item()
    config = OptimConfig(lr=5e-2, epochs=3, batch_size=8, warmup_epochs=0)
    history = fit(head, feats, labels, config, seed=0, quiet=True)
    assert history[0]["loss"] == pytest.approx(before, rel=1e-6)
    assert F.cross_entropy(head(feats), labels).item() < before


def test_a_non_contiguous_bank_draws_the_same_rows_as_its_contiguous_copy():
    wide = torch.randn(3, 7, 10, generator=torch.Generator().manual_seed(6))
    views = wide[:, :, ::2]  # (3, 7, 5), not contiguous
    assert not views.is_contiguous()
    strided, dense = ViewBank(views, seed=9), ViewBank(views.contiguous(), seed=9)
    for epoch in range(7):
        assert torch.equal(strided.epoch(epoch), dense.epoch(epoch))


def _reference_logits(z, base, residual, alpha):
    return z @ F.normalize(base + alpha * residual, dim=-1).t()


def test_column_cosine_and_its_loss_default_to_alpha_one():
    g = torch.Generator().manual_seed(7)
    z, base, residual = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    targets = torch.tensor([0, 1, 2, 3, 0])
    reference = _reference_logits(z, base, residual, 1.0)
    torch.testing.assert_close(column_cosine(z, base, residual), reference)
    loss, logits = column_cosine_cross_entropy(z, targets, base, residual)
    torch.testing.assert_close(logits, reference)
    torch.testing.assert_close(loss, F.cross_entropy(reference, targets))


def test_residual_gradient_with_alpha_two_and_a_dead_column_matches_autograd():
    """Only the residual trains (TaskRes's case, alpha folded into the (C,) factors): its gradient with alpha = 2
    equals autograd's, also for a column whose norm is under F.normalize's eps and whose upstream gradient is 0
    (exactly 0 there, as F.normalize's clamp gives)."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    base = torch.randn(3, 4, generator=g, dtype=torch.float64)
    base[2] = 1e-14
    upstream = torch.randn(6, 3, generator=g, dtype=torch.float64)
    upstream[:, 2] = 0.0
    residual = torch.zeros(3, 4, dtype=torch.float64)
    residual[:2] = torch.randn(2, 4, generator=g, dtype=torch.float64)
    ours = residual.clone().requires_grad_()
    (column_cosine(z, base, ours, 2.0) * upstream).sum().backward()
    theirs = residual.clone().requires_grad_()
    (_reference_logits(z, base, theirs, 2.0) * upstream).sum().backward()
    assert torch.equal(theirs.grad[2], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=0)


def test_taskres_head_train_defaults_to_training_mode():
    head = TaskResHead(torch.randn(3, 4), 30.0, TaskResConfig(alpha=0.5))
    head.eval()
    assert head.train() is head
    assert head.training
    assert not head.train(False).training


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_column_whose_norm_is_exactly_eps_gets_the_clamps_gradient(dtype):
    """At |t| == eps F.normalize's clamp passes no gradient to the norm (torch's clamp_min), so the column's
    gradient is the linear term alone; the hand-written backward agrees with autograd there."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(5, 3, generator=g, dtype=dtype)
    base = torch.randn(2, 3, generator=g, dtype=dtype)
    base[1] = torch.tensor([1e-12, 0.0, 0.0], dtype=dtype)
    assert base[1].norm().item() == torch.tensor(1e-12, dtype=dtype).item()
    upstream = torch.randn(5, 2, generator=g, dtype=dtype)
    ours = base.clone().requires_grad_()
    (column_cosine(z, ours) * upstream).sum().backward()
    theirs = base.clone().requires_grad_()
    (z @ F.normalize(theirs, dim=-1).t() * upstream).sum().backward()
    expected = (upstream[:, 1:].t() @ z) / base[1].norm()
    torch.testing.assert_close(theirs.grad[1:], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=0)
