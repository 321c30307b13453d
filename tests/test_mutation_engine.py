"""The training engine against a training loop written out here from the documented protocol (docs/protocol.md#
optimisation, docs/mutation.md): the optimiser's hyper-parameters, the warm-up + cosine schedule (per epoch) and the
cosine per iteration, seeded shuffling, Dassl's drop-last rule, the per-epoch records, and the divergence check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from taskres.engine import OptimConfig, epoch_lr, fit, iteration_lr, make_optimizer
from taskres.errors import TaskResError


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
