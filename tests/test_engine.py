"""The optimiser, schedule and batching against an independent re-derivation of the official computation."""

import math

import torch

from taskres.engine import OptimConfig, epoch_lr, fit
from taskres.methods.taskres import TaskResConfig, TaskResHead


def official_lr(epoch, lr, epochs):
    # Dassl: ConstantWarmupScheduler(cons_lr=1e-5, warmup_epoch=1) wrapping CosineAnnealingLR(T_max=epochs).
    return 1e-5 if epoch == 0 else lr * (1 + math.cos(math.pi * (epoch - 1) / epochs)) / 2


def test_schedule_matches_torch_schedulers():
    """Re-derive the schedule with torch's own CosineAnnealingLR stepped per epoch after one constant epoch."""
    cfg = OptimConfig(lr=2e-3, epochs=12)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    lrs = [1e-5]
    for _ in range(1, cfg.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    for e in range(cfg.epochs):
        assert math.isclose(epoch_lr(cfg, e), lrs[e], rel_tol=1e-9)
        assert math.isclose(epoch_lr(cfg, e), official_lr(e, cfg.lr, cfg.epochs), rel_tol=1e-12)


def reference_taskres(base, feats, labels, logit_scale, alpha, lr, epochs, weight_decay):
    """Full-batch TaskRes written out: logits, cross-entropy, Adam with L2 decay, per-epoch schedule."""
    x = torch.zeros_like(base)
    m, v = torch.zeros_like(base), torch.zeros_like(base)
    b1, b2, eps = 0.9, 0.999, 1e-8
    z = feats / feats.norm(dim=-1, keepdim=True)
    for step in range(1, epochs + 1):
        x.requires_grad_(True)
        t = base + alpha * x
        t = t / t.norm(dim=-1, keepdim=True)
        logits = logit_scale * z @ t.t()
        loss = -(logits.log_softmax(dim=1)[torch.arange(len(labels)), labels]).mean()
        (grad,) = torch.autograd.grad(loss, x)
        x = x.detach()
        g = grad + weight_decay * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
        x = x - official_lr(step - 1, lr, epochs) * m_hat / (v_hat.sqrt() + eps)
    return x


def test_full_batch_training_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 24, generator=g)
    feats = torch.randn(40, 24, generator=g)
    labels = torch.arange(40) % 5
    cfg = OptimConfig(lr=2e-3, epochs=30, batch_size=256, weight_decay=5e-4)
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5))
    fit(head, feats, labels, cfg, seed=3, quiet=True)
    expected = reference_taskres(base, feats, labels, 100.0, 0.5, cfg.lr, cfg.epochs, cfg.weight_decay)
    assert expected.abs().max() > 1e-3  # the residual did move
    torch.testing.assert_close(head.text_feature_residuals.detach(), expected, rtol=1e-4, atol=1e-6)


class Recorder(torch.nn.Module):
    """A head that records which rows each batch held."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 2))
        self.batches = []

    def forward(self, x):
        self.batches.append(x[:, 0].long().tolist())
        return x @ self.w.t()


def run_batches(n, batch_size, epochs=2, views=None, seed=0):
    feats = torch.stack([torch.arange(n).float(), torch.ones(n)], dim=1)
    if views:
        feats = torch.stack([feats + 1000 * v * torch.tensor([1.0, 0.0]) for v in range(views)])
    head = Recorder()
    fit(
        head,
        feats,
        torch.zeros(n, dtype=torch.long),
        OptimConfig(epochs=epochs, batch_size=batch_size),
        seed=seed,
        quiet=True,
    )
    return head.batches


def test_drop_last_only_when_a_full_batch_exists():
    batches = run_batches(10, 4, epochs=1)
    assert [len(b) for b in batches] == [4, 4]  # the partial batch of 2 is dropped
    batches = run_batches(3, 4, epochs=1)
    assert [len(b) for b in batches] == [3]  # fewer than one batch: kept
    assert sorted(batches[0]) == [0, 1, 2]


def test_shuffled_every_epoch_and_seeded():
    first = run_batches(16, 16, epochs=3)
    assert first == run_batches(16, 16, epochs=3)
    assert first[0] != first[1] and sorted(first[0]) == list(range(16))


def views_seen(batches, n):
    """(epochs, n): the view each image read in each epoch (one full batch per epoch)."""
    rows = []
    for batch in batches:
        view_of = {x % 1000: x // 1000 for x in batch}
        rows.append([view_of[i] for i in range(n)])
    return torch.tensor(rows)


def test_every_image_visits_each_view_once_per_cycle_in_a_seeded_order():
    seen = views_seen(run_batches(8, 8, epochs=6, views=3, seed=1), 8)  # (6, 8)
    for cycle in (seen[:3], seen[3:]):
        assert all(sorted(cycle[:, i].tolist()) == [0, 1, 2] for i in range(8))
    assert not all(len(set(seen[e].tolist())) == 1 for e in range(6))  # images do not move in lockstep
    assert torch.equal(seen, views_seen(run_batches(8, 8, epochs=6, views=3, seed=1), 8))
    assert not torch.equal(seen, views_seen(run_batches(8, 8, epochs=6, views=3, seed=2), 8))


def test_the_logged_loss_is_the_float64_sum_of_the_batch_losses_in_step_order():
    """fit logs, per epoch, sum over steps of float64(batch loss) * batch size, added in step order, over the
    samples (the partial last batch weighted by its size), and the share of argmax hits: checked against that
    formula written out, with batch losses whose float32 values make the order and the weights visible."""

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))
            self.losses = iter([0.1, 1e8, 0.3, 7.0, 1e-3, 2.5])

        def train_step(self, inputs, targets):
            self.w.grad = torch.zeros(3)
            logits = torch.zeros(len(targets), 3)
            logits[:, 1] = 1.0
            return torch.tensor(next(self.losses), dtype=torch.float32), logits

    labels = torch.tensor([1, 0, 1, 2, 1, 1, 0, 1, 2, 1])  # 10 samples, batches of 4: 4, 4, 2
    log = fit(
        Scripted(), torch.zeros(10, 2), labels, OptimConfig(lr=1e-3, epochs=2, batch_size=4, drop_last="never"), seed=0
    )
    values = [0.1, 1e8, 0.3, 7.0, 1e-3, 2.5]
    for epoch, record in enumerate(log):
        total = torch.zeros((), dtype=torch.float64)
        for value, size in zip(values[3 * epoch : 3 * epoch + 3], (4, 4, 2)):
            total += torch.tensor(value, dtype=torch.float32).double() * size
        assert record["loss"] == float(total) / 10
        assert record["train_accuracy"] == 60.0  # six of the labels are class 1, every argmax


def test_a_module_that_is_not_a_head_trains_with_its_own_train_loss():
    """fit takes any module: one with a train_loss (and no train_step) is trained on that loss through autograd,
    not on the cross-entropy of its forward."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2, 3))

        def forward(self, x):
            return x @ self.w

        def train_loss(self, inputs, targets):
            logits = self(inputs)
            return (logits**2).mean() + 5.0, logits

    module = Scaled()
    log = fit(module, torch.zeros(6, 2), torch.zeros(6, dtype=torch.long), OptimConfig(lr=1e-3, epochs=1), seed=0)
    assert log[0]["loss"] == 5.0 and module.w.grad is not None  # zero inputs: the loss is the constant alone
