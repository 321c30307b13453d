"""The private training kernels (``taskres.methods._fused``) against autograd through ``F.normalize`` in float64:
the column-scaled cosine and its hand-written backward, the cross-entropy fused into it, the closed-form residual
step bit for bit; and ``ResidualTraining``, the steps TaskRes trains with, against the Head defaults and a training
loop written out with the normalised form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import taskres.methods._fused as fused
from taskres.engine import OptimConfig, fit
from taskres.methods._fused import column_cosine, column_cosine_cross_entropy, column_cosine_residual_step
from taskres.methods.base import Head, cosine_logits, scaled_unit
from taskres.methods.taskres import TaskResConfig, TaskResHead


def _reference(z: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * F.normalize(z, dim=-1) @ F.normalize(t, dim=-1).t()


def cosine_logits_columns(z: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    return column_cosine(scaled_unit(z, scale), t)


def cosine_logits_residual(z: torch.Tensor, base: torch.Tensor, x: torch.Tensor, alpha: float, scale: float):
    return column_cosine(scaled_unit(z, scale), base, x, alpha)


def test_columns_form_has_the_value_and_gradients_of_the_normalised_form():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(7, 4, dtype=torch.float64, generator=g)
    ours, ref = cosine_logits_columns(z, t, 3.0), _reference(z, t, 3.0)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(ours, (z, t), upstream)
    ref_grads = torch.autograd.grad(ref, (z, t), upstream)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: cosine_logits_columns(a, b, 2.0), (z, t))


def test_a_zero_classifier_row_gets_the_clamped_gradient_of_f_normalize():
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, dtype=torch.float64)
    t[1] = 0.0
    t.requires_grad_(True)
    upstream = torch.randn(3, 2, dtype=torch.float64)
    ours = torch.autograd.grad(cosine_logits_columns(z, t, 1.0), t, upstream)[0]
    ref = torch.autograd.grad(_reference(z, t, 1.0), t, upstream)[0]
    assert torch.isfinite(ours).all() and torch.allclose(ours, ref, rtol=1e-10, atol=0)  # 1/eps-sized, as F.normalize


def test_the_residual_form_has_the_gradients_of_autograd_through_t_plus_alpha_x():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    base = torch.randn(3, 5, dtype=torch.float64, generator=g)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(6, 3, dtype=torch.float64, generator=g)
    ours = cosine_logits_residual(z, base, x, 0.7, 2.0)
    ref = _reference(z, base + 0.7 * x, 2.0)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (z, x), upstream), torch.autograd.grad(ref, (z, x), upstream)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    base.requires_grad_(True)  # both sides of the sum
    grads = torch.autograd.grad(cosine_logits_residual(z, base, x, 0.7, 2.0), (base, x), upstream)
    refs = torch.autograd.grad(_reference(z, base + 0.7 * x, 2.0), (base, x), upstream)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(grads, refs))


def test_the_residual_alone_gets_the_gradient_of_autograd_through_t_plus_alpha_x():
    """The training path: the image side is fixed, so only the residual needs a gradient (alpha is folded into the
    (C,) factors there)."""
    g = torch.Generator().manual_seed(5)
    f = torch.randn(6, 5, dtype=torch.float64, generator=g)
    base = torch.randn(3, 5, dtype=torch.float64, generator=g)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(6, 3, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad(column_cosine(scaled_unit(f, 2.0), base, x, 0.7), x, upstream)[0]
    ref = torch.autograd.grad(_reference(f, base + 0.7 * x, 2.0), x, upstream)[0]
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)


def _reference_residual(z, base, residual, alpha):
    return z @ F.normalize(base + alpha * residual, dim=-1).t()


def test_column_cosine_and_its_loss_default_to_alpha_one():
    g = torch.Generator().manual_seed(7)
    z, base, residual = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    targets = torch.tensor([0, 1, 2, 3, 0])
    reference = _reference_residual(z, base, residual, 1.0)
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
    (_reference_residual(z, base, theirs, 2.0) * upstream).sum().backward()
    assert torch.equal(theirs.grad[2], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=0)


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


def test_the_fused_cross_entropy_has_the_loss_and_gradients_of_autograd():
    """column_cosine_cross_entropy against F.cross_entropy of the normalised form through autograd (float64): the
    loss, the logits, and the gradients for the residual alone (TaskRes), the residual with the image side
    (TaskRes with an image residual) and the base."""
    g = torch.Generator().manual_seed(10)
    f = torch.randn(7, 5, dtype=torch.float64, generator=g)
    base = torch.randn(4, 5, dtype=torch.float64, generator=g)
    targets = torch.tensor([0, 3, 3, 1, 2, 0, 1])
    for wrt in ("residual", "image and residual", "base"):
        x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
        image = f.clone().requires_grad_(wrt == "image and residual")
        b = base.clone().requires_grad_(wrt == "base")
        inputs = [v for v in (image, b, x) if v.requires_grad]
        loss, logits = column_cosine_cross_entropy(2.0 * F.normalize(image, dim=-1), targets, b, x, 0.7)
        ref_logits = _reference(image, b + 0.7 * x, 2.0)
        ref = F.cross_entropy(ref_logits, targets)
        assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-12) and not logits.requires_grad
        assert torch.allclose(loss, ref, rtol=0, atol=1e-12)
        ours, theirs = torch.autograd.grad(3.0 * loss, inputs), torch.autograd.grad(3.0 * ref, inputs)
        assert all(torch.allclose(a, c, rtol=0, atol=1e-12) for a, c in zip(ours, theirs)), wrt


def test_the_closed_form_residual_step_is_autograd_bit_for_bit():
    """column_cosine_residual_step (no autograd, buffers reused) against column_cosine_cross_entropy and a
    backward: the same loss, logits and residual gradient to the bit, with a zero class row (the clamp) and with
    and without the output buffers."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(6, 12, generator=g)
    base[2] = 0.0
    x = torch.randn(6, 12, generator=g) * 0.1
    x[2] = 0.0
    z = scaled_unit(torch.randn(9, 12, generator=g), 50.0)
    targets = torch.randint(0, 6, (9,), generator=g)
    leaf = x.clone().requires_grad_(True)
    loss, logits = column_cosine_cross_entropy(z, targets, base, leaf, 0.3)
    loss.backward()
    for t_out, grad_out in ((None, None), (torch.empty(6, 12), torch.full((6, 12), float("nan")))):
        ours_loss, ours_logits, ours_grad = column_cosine_residual_step(z, targets, base, x, 0.3, t_out, grad_out)
        assert torch.equal(ours_loss, loss.detach()) and torch.equal(ours_logits, logits)
        assert torch.equal(ours_grad, leaf.grad) and not ours_grad.requires_grad
        assert grad_out is None or ours_grad.data_ptr() == grad_out.data_ptr()
        assert t_out is None or torch.equal(t_out, torch.add(base, x, alpha=0.3))  # t formed where asked
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0  # the zero row: the clamp's gradient
    # float64, and a batch of 9: the mean's 1/9 is rounded in the loss's dtype, as autograd's
    z64, base64, x64 = z.double(), base.double(), x.double()
    leaf64 = x64.clone().requires_grad_(True)
    loss64, _ = column_cosine_cross_entropy(z64, targets, base64, leaf64, 0.3)
    loss64.backward()
    assert torch.equal(column_cosine_residual_step(z64, targets, base64, x64, 0.3)[2], leaf64.grad)


# ---- ResidualTraining: TaskRes's training steps ------------------------------------------------------------------


def test_a_head_evaluates_in_the_normalised_form_and_trains_in_the_columns_form():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 8, generator=g)
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5))
    with torch.no_grad():
        head.text_feature_residuals.normal_(generator=g)
    z = torch.randn(5, 8, generator=g)
    classifier = base + 0.5 * head.text_feature_residuals.detach()
    assert torch.equal(head(z), cosine_logits(z, classifier, 100.0))  # what eval and predict compute, bit for bit
    assert torch.allclose(head.train_logits(head.train_inputs(z)), head(z), rtol=0, atol=1e-4)


def test_fit_with_the_columns_form_lands_where_the_normalised_form_does():
    """The same training, once through the engine (columns form, fused step) and once written out with the
    normalised form and torch's per-tensor Adam: the residuals agree to float rounding."""
    g = torch.Generator().manual_seed(2)
    classes, dim, n = 4, 16, 48
    base = torch.randn(classes, dim, generator=g)
    feats = torch.randn(n, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(n // classes)
    config = OptimConfig(lr=2e-3, epochs=6, batch_size=16, warmup_epochs=1)
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5))
    fit(head, feats, labels, config, seed=3, quiet=True)

    x = torch.zeros(classes, dim, requires_grad=True)
    opt = torch.optim.Adam([x], lr=config.lr, weight_decay=config.weight_decay, foreach=False, fused=False)
    order_gen = torch.Generator().manual_seed(3)
    for epoch in range(config.epochs):
        lr = (
            config.warmup_lr
            if epoch < 1
            else config.lr * (1 + torch.cos(torch.tensor(torch.pi * (epoch - 1) / config.epochs)).item()) / 2
        )
        for group in opt.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=order_gen)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = F.cross_entropy(_reference(feats[idx], base + 0.5 * x, 100.0), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert not torch.equal(head.text_feature_residuals.detach(), torch.zeros_like(x))
    assert torch.allclose(head.text_feature_residuals.detach(), x.detach(), rtol=0, atol=1e-5)


def _fit_taskres(views: torch.Tensor, labels: torch.Tensor, base: torch.Tensor, variant: str = "text"):
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5, variant=variant))
    history = fit(head, views, labels, OptimConfig(lr=2e-3, epochs=5, batch_size=8), seed=7, quiet=True)
    return head, history


def test_a_trained_image_side_is_not_mapped_ahead():
    """TaskRes with an image residual changes tau * f / |f| while it trains: train_inputs leaves the features as they
    are, and the image residual gets its gradient."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(4, 16, generator=g)
    feats = torch.randn(20, 16, generator=g)
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5, variant="both"))
    assert head.train_inputs(feats) is feats
    plain = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5))
    assert torch.allclose(plain.train_inputs(feats), 100.0 * F.normalize(feats, dim=-1), rtol=0, atol=0)
    trained, _ = _fit_taskres(feats, torch.arange(4).repeat_interleave(5), base, variant="both")
    assert trained.image_feature_residual is not None
    assert not torch.equal(trained.image_feature_residual.detach(), torch.zeros(1, 16))


def test_the_reused_classifier_buffer_fails_loudly_rather_than_giving_a_stale_gradient():
    """TaskRes forms t + alpha * x in one buffer step after step. A second forward before the first backward
    overwrites what that backward needs: torch's in-place check must stop it. After fit the buffer is dropped."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(4, 16, generator=g)
    feats = torch.randn(6, 16, generator=g)
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5)).train()
    first = head.train_logits(head.train_inputs(feats)).sum()
    head.train_logits(head.train_inputs(feats))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()
    trained, _ = _fit_taskres(feats, torch.arange(4).repeat_interleave(2)[:6], base)
    assert trained._buffers_in_training == {} and not trained.training


def test_taskres_steps_reuse_one_gradient_and_one_classifier_buffer():
    """Step after step, the closed-form TaskRes step forms t and the residual's gradient in the same two (C, D)
    tensors (no fresh tensor a step), and the gradient it leaves is the step's own."""
    g = torch.Generator().manual_seed(23)
    base = torch.randn(5, 16, generator=g)
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5)).train()
    x = head.text_feature_residuals
    batches = [torch.randn(8, 16, generator=g) for _ in range(2)]
    targets = torch.arange(8) % 5
    pointers = []
    for batch in batches:
        with torch.no_grad():
            x.add_(0.01)
        x.grad = None
        head.train_step(head.train_inputs(batch), targets)
        expected = column_cosine_residual_step(head.train_inputs(batch), targets, base, x.detach(), 0.5)[2]
        assert torch.equal(x.grad, expected)
        t = head._buffers_in_training["t"]
        assert torch.equal(t, torch.add(base, x.detach(), alpha=0.5))  # this step's t, formed in the buffer
        pointers.append((x.grad.data_ptr(), t.data_ptr()))
    assert pointers[0] == pointers[1] and pointers[0][0] != pointers[0][1]


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw"])
@pytest.mark.parametrize("transposed_base", [False, True])
def test_fit_trains_taskres_in_closed_form_as_autograd_would(monkeypatch, optimizer, transposed_base):
    """The text-only TaskRes step in closed form (TaskResHead.train_step) against the Head default (autograd through
    train_loss): the same residual and the same log, bit for bit, over a few epochs with a partial last batch, for
    each optimiser, and with a base stored transposed (column-major), whose gradient must still be laid out as x."""
    g = torch.Generator().manual_seed(22)
    base = torch.randn(16, 5, generator=g).t() if transposed_base else torch.randn(5, 16, generator=g)
    feats = torch.randn(2, 23, 16, generator=g)
    labels = torch.arange(23) % 5
    config = OptimConfig(lr=1e-2, epochs=4, batch_size=8, drop_last="never", optimizer=optimizer)
    calls = []
    monkeypatch.setattr(
        fused, "column_cosine_residual_step", lambda *a, **k: calls.append(1) or column_cosine_residual_step(*a, **k)
    )
    fast = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5))
    fast_log = fit(fast, feats, labels, config, seed=3)
    assert len(calls) == 4 * 3  # every step took the closed form
    monkeypatch.setattr(TaskResHead, "train_step", Head.train_step)
    slow = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5))
    slow_log = fit(slow, feats, labels, config, seed=3)
    assert len(calls) == 12
    assert torch.equal(fast.text_feature_residuals, slow.text_feature_residuals)
    assert fast_log == slow_log and fast.text_feature_residuals.abs().sum() > 0
    assert fast._buffers_in_training == {}


def test_the_closed_form_step_leaves_to_autograd_a_gradient_to_add_to_and_a_residual_of_another_dtype():
    """A gradient already in x.grad is added to (as autograd does), not overwritten; a residual whose dtype is not
    the base's (a float64 default dtype) trains through autograd instead of failing."""
    g = torch.Generator().manual_seed(24)
    base = torch.randn(5, 16, generator=g)
    z, targets = torch.randn(8, 16, generator=g), torch.arange(8) % 5
    heads = [TaskResHead(base, 100.0, TaskResConfig(alpha=0.5)).train() for _ in range(2)]
    for head, step in zip(heads, (TaskResHead.train_step, Head.train_step)):
        head.text_feature_residuals.grad = torch.ones(5, 16)
        step(head, head.train_inputs(z), targets)
    assert torch.equal(heads[0].text_feature_residuals.grad, heads[1].text_feature_residuals.grad)
    assert not torch.equal(heads[0].text_feature_residuals.grad, torch.ones(5, 16))
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5)).train()
    head.text_feature_residuals.data = head.text_feature_residuals.data.double()
    loss, _ = head.train_step(head.train_inputs(z), targets)
    assert head.text_feature_residuals.grad.dtype == torch.float64 and torch.isfinite(loss)


def test_taskres_head_train_defaults_to_training_mode():
    head = TaskResHead(torch.randn(3, 4), 30.0, TaskResConfig(alpha=0.5))
    head.eval()
    assert head.train() is head
    assert head.training
    assert not head.train(False).training
