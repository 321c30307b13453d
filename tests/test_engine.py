"""The training engine against training loops written out here from the documented protocol (docs/protocol.md#
optimisation, docs/mutation.md) and against torch's own schedulers and optimisers: the optimiser's hyper-parameters,
the warm-up + cosine schedule (per epoch) and the cosine per iteration, seeded shuffling, Dassl's drop-last rule,
the views each epoch reads, the per-epoch records and their loss, the divergence check, the fused optimiser, the
view bank mapped once, and the training step a head (or any module) defines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskres import engine
from taskres.engine import OptimConfig, epoch_lr, fit, iteration_lr, make_optimizer, prepare_views
from taskres.errors import TaskResError
from taskres.methods.base import Head
from taskres.methods.taskres import TaskResConfig, TaskResHead
from taskres.views import ViewBank

# ---- the loop against one written out ---------------------------------------------------------------------------


class Linear(torch.nn.Module):
    def __init__(self, d=6, c=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(c, d, generator=g) * 0.1)
        self.b = torch.nn.Parameter(torch.zeros(c))
        self.register_buffer("frozen", torch.ones(1))

    def forward(self, x):
        return x @ self.w.t() + self.b


def schedule(cfg: OptimConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The documented schedules, written out."""
    if cfg.schedule == "iteration":
        t, total = epoch * steps_per_epoch + step, cfg.epochs * steps_per_epoch
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * t / total))
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))


def reference_fit(model, feats, labels, cfg: OptimConfig, seed: int):
    """Seeded shuffle per epoch; the partial last batch dropped only when a full batch exists and drop_last is
    "auto"; the optimiser as the protocol names it."""
    params = [model.w, model.b]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=1.0, momentum=cfg.momentum, dampening=0, nesterov=False, weight_decay=cfg.weight_decay
        )
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1.0, betas=(0.9, 0.999), eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=1.0, betas=(0.9, 0.999), eps=cfg.eps, weight_decay=cfg.weight_decay)
    n, bs = len(labels), cfg.batch_size
    g = torch.Generator().manual_seed(seed)
    batches_per_epoch = n // bs if (cfg.drop_last == "auto" and n >= bs) else -(-n // bs)
    records = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        total, correct, seen = 0.0, 0, 0
        for step in range(batches_per_epoch):
            idx = order[step * bs : (step + 1) * bs]
            lr = schedule(cfg, epoch, step, batches_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(feats[idx])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == labels[idx]).sum())
            seen += len(idx)
        records.append(
            {
                "epoch": epoch,
                "lr": schedule(cfg, epoch, 0, batches_per_epoch),
                "loss": total / seen,
                "train_accuracy": 100.0 * correct / seen,
            }
        )
    return records


def data(n=23, d=6, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    feats = torch.randn(n, d, generator=g) + 2.0 * F.one_hot(labels, d).float()
    return feats, labels


CASES = {
    "adam, warm-up 2 epochs": OptimConfig(
        lr=5e-2, epochs=6, batch_size=8, weight_decay=1e-2, warmup_epochs=2, warmup_lr=3e-3
    ),
    "adam, eps": OptimConfig(lr=5e-2, epochs=4, batch_size=8, weight_decay=0.0, eps=0.5),
    "sgd": OptimConfig(lr=0.2, epochs=5, batch_size=5, weight_decay=1e-2, optimizer="sgd", momentum=0.7),
    # 23 images in batches of 12, never dropped: 2 steps an epoch (a count whose square does not alias the cosine)
    "adamw, per iteration, never drop": OptimConfig(
        lr=5e-2,
        epochs=4,
        batch_size=12,
        weight_decay=0.1,
        optimizer="adamw",
        schedule="iteration",
        warmup_epochs=0,
        drop_last="never",
        eps=1e-3,
    ),
    "batch larger than the set": OptimConfig(lr=5e-2, epochs=3, batch_size=64),
    "one full batch exactly": OptimConfig(lr=5e-2, epochs=3, batch_size=23),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fit_is_the_documented_training_loop(case):
    cfg = CASES[case]
    feats, labels = data()
    model, reference = Linear(), Linear()
    history = fit(model, feats, labels, cfg, seed=7, quiet=True)
    expected = reference_fit(reference, feats, labels, cfg, seed=7)
    torch.testing.assert_close(model.w.detach(), reference.w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.b.detach(), reference.b.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.w.detach(), Linear().w)  # it trained
    assert [r["epoch"] for r in history] == list(range(cfg.epochs))
    for got, want in zip(history, expected):
        assert math.isclose(got["lr"], want["lr"], rel_tol=1e-12)
        assert math.isclose(got["loss"], want["loss"], rel_tol=1e-5)
        assert math.isclose(got["train_accuracy"], want["train_accuracy"], rel_tol=1e-9)
    assert not model.training  # left in eval mode


def test_fit_seed_changes_the_shuffle_and_reruns_reproduce():
    feats, labels = data()
    cfg = OptimConfig(lr=5e-2, epochs=3, batch_size=8)
    runs = []
    for seed in (1, 1, 2):
        model = Linear()
        fit(model, feats, labels, cfg, seed=seed, quiet=True)
        runs.append(model.w.detach())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_fit_reads_each_epochs_view_and_calls_back():
    feats, labels = data(n=12)
    views = torch.stack([feats, -feats, feats * 2])  # (V, N, D)
    cfg = OptimConfig(lr=5e-2, epochs=3, batch_size=4)
    seen = []
    model = Linear()
    history = fit(model, views, labels, cfg, seed=0, quiet=True, on_epoch=seen.append)
    assert seen == history and len(seen) == 3


def test_fit_refuses_empty_sets_and_frozen_heads():
    cfg = OptimConfig(lr=1e-2, epochs=1, batch_size=4)
    with pytest.raises(
        TaskResError, match="^the training set is empty; check --shots and the split file's train entries.$"
    ):
        fit(Linear(), torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), cfg, seed=0, quiet=True)
    frozen = Linear().requires_grad_(False)
    with pytest.raises(TaskResError, match="^the method has no trainable parameters.$"):
        fit(frozen, *data(), cfg, seed=0, quiet=True)


def test_divergence_is_an_error_naming_the_epoch():
    feats, labels = data()
    model = Linear()
    with torch.no_grad():
        model.w[0, 0] = float("nan")
    cfg = OptimConfig(lr=1e-2, epochs=3, batch_size=8)
    with pytest.raises(TaskResError, match=r"diverged in epoch 1 of 3: loss, the trained parameters") as err:
        fit(model, feats, labels, cfg, seed=0, quiet=True)
    assert err.value.param == "lr"  # the CLI names --lr as the setting to change
    model = Linear()
    with torch.no_grad():
        model.b[0] = float("inf")
    with pytest.raises(TaskResError, match=r"epoch 1 of 3"):
        fit(model, feats, labels, cfg, seed=0, quiet=True)


def test_schedules_written_out():
    cfg = OptimConfig(lr=2e-3, epochs=10, warmup_epochs=3, warmup_lr=1e-4)
    assert [epoch_lr(cfg, e) for e in range(3)] == [1e-4] * 3
    assert epoch_lr(cfg, 3) == pytest.approx(2e-3, rel=1e-12)
    assert epoch_lr(cfg, 8) == pytest.approx(1e-3, rel=1e-12)
    assert epoch_lr(cfg, 13) == pytest.approx(0.0, abs=1e-18)
    no_warmup = OptimConfig(lr=1.0, epochs=4, warmup_epochs=0)
    assert [epoch_lr(no_warmup, e) for e in range(4)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)]
    )
    it = OptimConfig(lr=1.0, epochs=2, schedule="iteration", warmup_epochs=0)
    assert [iteration_lr(it, s, 4) for s in range(4)] == pytest.approx(
        [1.0, 0.5 + 0.5**0.5 / 2, 0.5, 0.5 - 0.5**0.5 / 2]
    )


# ---- schedules and optimisers -----------------------------------------------------------------------------------


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


def test_iteration_schedule_matches_torch_cosine_annealing():
    cfg = OptimConfig(
        lr=1e-3,
        epochs=3,
        batch_size=4,
        schedule="iteration",
        warmup_epochs=0,
        drop_last="never",
        optimizer="adamw",
        eps=1e-4,
        weight_decay=0.01,
    )
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=9)
    for step in range(9):
        assert math.isclose(iteration_lr(cfg, step, 9), opt.param_groups[0]["lr"], rel_tol=1e-9)
        opt.step()
        sched.step()
    with pytest.raises(TaskResError, match="no warm-up"):
        OptimConfig(schedule="iteration")


def test_defaults_are_taskres_published_settings():
    cfg = OptimConfig()
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.weight_decay) == (2e-3, 200, 256, 5e-4)
    assert (cfg.warmup_lr, cfg.warmup_epochs, cfg.optimizer, cfg.momentum, cfg.eps) == (1e-5, 1, "adam", 0.9, 1e-8)
    assert (cfg.schedule, cfg.drop_last) == ("epoch", "auto")
    p = [torch.nn.Parameter(torch.zeros(2))]
    adam = make_optimizer(p, cfg)
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["betas"] == (0.9, 0.999) and adam.defaults["eps"] == 1e-8
    assert adam.defaults["weight_decay"] == 5e-4 and adam.defaults["lr"] == 2e-3
    sgd = make_optimizer(p, OptimConfig(lr=0.3, optimizer="sgd", momentum=0.8, weight_decay=1e-3))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.8 and sgd.defaults["dampening"] == 0
    assert sgd.param_groups[0]["lr"] == 0.3
    assert sgd.defaults["weight_decay"] == 1e-3 and not sgd.defaults["nesterov"]
    adamw = make_optimizer(p, OptimConfig(lr=0.02, optimizer="adamw", eps=1e-6, weight_decay=0.01))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["eps"] == 1e-6
    assert adamw.param_groups[0]["lr"] == 0.02 and adamw.defaults["betas"] == (0.9, 0.999)
    assert adamw.defaults["weight_decay"] == 0.01


@pytest.mark.parametrize(
    "kwargs, ok",
    [
        (dict(lr=0.0), False),
        (dict(lr=float("inf")), False),
        (dict(lr=1e-9), True),
        (dict(epochs=0), False),
        (dict(batch_size=0), False),
        (dict(epochs=1, warmup_epochs=1), True),
        (dict(weight_decay=-1e-9), False),
        (dict(weight_decay=0.0), True),
        (dict(weight_decay=float("inf")), False),
        (dict(warmup_epochs=-1), False),
        (dict(epochs=3, warmup_epochs=4), False),
        (dict(epochs=3, warmup_epochs=3), True),
        (dict(optimizer="rmsprop"), False),
        (dict(schedule="step"), False),
        (dict(drop_last="always"), False),
        (dict(schedule="iteration"), False),
        (dict(schedule="iteration", warmup_epochs=0), True),
        (dict(momentum=1.0), False),
        (dict(momentum=0.0), True),
        (dict(momentum=-0.1), False),
        (dict(eps=0.0), False),
        (dict(eps=1e-30), True),
    ],
)
def test_optim_config_bounds(kwargs, ok):
    if ok:
        OptimConfig(**kwargs)
    else:
        with pytest.raises(TaskResError):
            OptimConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr must be a finite number > 0; got -1.0."),
        (dict(epochs=0), "epochs must be a finite number > 0; got 0."),
        (dict(batch_size=-3), "batch_size must be a finite number > 0; got -3."),
        (dict(weight_decay=-0.5), "weight_decay must be a finite number >= 0; got -0.5."),
        (dict(epochs=2, warmup_epochs=5), "warmup_epochs must be in [0, epochs]; got 5."),
        (dict(optimizer="rmsprop"), "optimizer must be one of adam, sgd, adamw; got 'rmsprop'."),
        (dict(schedule="step"), "schedule must be one of epoch, iteration; got 'step'."),
        (dict(drop_last="always"), "drop_last must be one of auto, never; got 'always'."),
        (
            dict(schedule="iteration", warmup_epochs=2),
            "warmup_epochs must be 0 with the per-iteration cosine schedule (it has no warm-up); got 2.",
        ),
        (dict(momentum=1.5), "momentum must be in [0, 1); got 1.5."),
        (dict(eps=-1e-3), "eps must be > 0; got -0.001."),
    ],
)
def test_optim_config_errors_name_the_setting_and_the_rule(kwargs, message):
    """A bad setting is reported by its name (the CLI maps the name to its flag), its rule and its value."""
    with pytest.raises(TaskResError) as err:
        OptimConfig(**kwargs)
    assert str(err.value) == message
    assert err.value.param == message.split(" ")[0]


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


# ---- batches and views ------------------------------------------------------------------------------------------


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


class LrRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 2))
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        return x @ self.w.t()


def test_sgd_and_never_dropping_the_partial_batch():
    """10 samples, batch 4, drop_last never: 4, 4, 2 per epoch; SGD with momentum moves the weights as torch's."""
    feats, labels = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 2
    cfg = OptimConfig(
        lr=0.1,
        epochs=1,
        batch_size=4,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=0.0,
        warmup_epochs=0,
        drop_last="never",
    )
    head = LrRecorder()
    fit(head, feats, labels, cfg, seed=0, quiet=True)
    assert head.sizes == [4, 4, 2]
    # the same three steps with torch's SGD, in the engine's order
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([w], lr=0.1 * (1 + math.cos(0)) / 2, momentum=0.9)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    for start in (0, 4, 8):
        idx = order[start : start + 4]
        opt.zero_grad()
        F.cross_entropy(feats[idx] @ w.t(), labels[idx]).backward()
        opt.step()
    torch.testing.assert_close(head.w.detach(), w.detach())


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


def _fit_taskres(views: torch.Tensor, labels: torch.Tensor, base: torch.Tensor):
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5))
    history = fit(head, views, labels, OptimConfig(lr=2e-3, epochs=5, batch_size=8), seed=7, quiet=True)
    return head, history


def test_the_view_bank_mapped_once_trains_exactly_as_mapped_per_batch(monkeypatch):
    """The engine maps a small bank of cached views through train_inputs once per run, a large one batch by batch
    (PREPARED_BANK_MAX_BYTES): the residual and the log are the same bit for bit, one view or several."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(4, 16, generator=g)
    labels = torch.arange(4).repeat_interleave(5)
    for views in (torch.randn(20, 16, generator=g) * 3, torch.randn(3, 20, 16, generator=g) * 3):
        once, log_once = _fit_taskres(views, labels, base)
        monkeypatch.setattr(engine, "PREPARED_BANK_MAX_BYTES", 0)
        per_batch, log_per_batch = _fit_taskres(views, labels, base)
        monkeypatch.undo()
        assert not torch.equal(once.text_feature_residuals, torch.zeros(4, 16))
        assert torch.equal(once.text_feature_residuals, per_batch.text_feature_residuals)
        assert log_once == log_per_batch


# ---- the training step ------------------------------------------------------------------------------------------


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


class _Probe(Head):
    """A linear head with the Head defaults: train_inputs, train_logits (its forward) and train_loss."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.linear.state_dict())


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
