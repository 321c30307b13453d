"""The TaskRes head, the cosine head and the metrics against the formulas written out here (docs/mutation.md):
logits = tau * cos(z + alpha r, t + alpha x); the paper's presets; accuracy and per-class accuracy by brute force."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import cluster_context

from taskres.engine import OptimConfig
from taskres.errors import TaskResError
from taskres.evaluate import accuracy_metrics, evaluate, predict_logits
from taskres.methods.base import CosineHead, Fitted, Head, config_options, cosine_logits, option
from taskres.methods.taskres import (
    IMAGENET_FAMILY,
    TaskResConfig,
    TaskResHead,
    config_preset,
    fit_taskres,
    optim_preset,
)


def cos_logits(z, t, tau):
    """tau * cos, one pair at a time."""
    out = torch.empty(len(z), len(t))
    for i in range(len(z)):
        for j in range(len(t)):
            out[i, j] = tau * torch.dot(z[i], t[j]) / (z[i].norm() * t[j].norm())
    return out


def trained_head(variant="both", alpha=0.7, learn_alpha=False, c=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(c, d, generator=g)
    head = TaskResHead(base, 30.0, TaskResConfig(alpha=alpha, variant=variant, learn_alpha=learn_alpha))
    with torch.no_grad():  # residuals as training would leave them
        head.text_feature_residuals.copy_(torch.randn(c, d, generator=g))
        if head.image_feature_residual is not None:
            head.image_feature_residual.copy_(torch.randn(1, d, generator=g))
    return head, base


@pytest.mark.parametrize("variant", ["text", "image", "both"])
def test_taskres_logits_are_the_papers_formula(variant):
    head, base = trained_head(variant)
    feats = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)) * 3
    x = head.text_feature_residuals.detach() if variant != "image" else torch.zeros_like(base)
    r = head.image_feature_residual.detach() if variant != "text" else torch.zeros(1, 8)
    if variant == "image":
        x = torch.zeros_like(base)
        with torch.no_grad():
            head.text_feature_residuals.copy_(torch.zeros_like(base))
    expected = cos_logits(feats + 0.7 * r, base + 0.7 * x, 30.0)
    torch.testing.assert_close(head(feats), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.classifier(), base + 0.7 * x)
    assert head.residual_mean_abs() == pytest.approx(float(x.abs().mean()))


@pytest.mark.parametrize(
    "variant, params",
    [
        ("text", {"text_feature_residuals"}),
        ("image", {"image_feature_residual"}),
        ("both", {"text_feature_residuals", "image_feature_residual"}),
    ],
)
@pytest.mark.parametrize("learn_alpha", [False, True])
def test_taskres_trains_exactly_its_residuals(variant, params, learn_alpha):
    head, _ = trained_head(variant, learn_alpha=learn_alpha)
    expected = params | ({"alpha"} if learn_alpha else set())
    assert {n for n, p in head.named_parameters() if p.requires_grad} == expected
    assert set(head.state_dict()) >= {"base_text_features", "text_feature_residuals", "alpha", "logit_scale"}
    assert float(head.alpha.detach()) == pytest.approx(0.7)


def test_taskres_export_round_trip_keeps_every_number():
    head, base = trained_head("both", alpha=0.3, learn_alpha=True)
    with torch.no_grad():
        head.alpha.fill_(0.45)  # a learned alpha moved away from its initial value
    tensors, meta = head.export()
    assert meta == {"alpha": pytest.approx(0.45), "variant": "both", "learn_alpha": True, "logit_scale": 30.0}
    assert set(tensors) == {"base_text_features", "text_feature_residuals", "image_feature_residual"}
    again = TaskResHead.from_export(tensors, meta)
    feats = torch.randn(6, 8)
    assert torch.equal(again(feats), head(feats))
    assert again.config.learn_alpha and again.config.variant == "both"
    text_only, _ = trained_head("text")
    t_tensors, t_meta = text_only.export()
    assert "image_feature_residual" not in t_tensors and t_meta["learn_alpha"] is False
    assert torch.equal(TaskResHead.from_export(t_tensors, t_meta)(feats), text_only(feats))
    # class selection keeps rows of the base and the residual together
    sub = head.select_classes([2, 0])
    torch.testing.assert_close(sub(feats), head(feats)[:, [2, 0]], rtol=1e-6, atol=1e-6)


def test_taskres_presets_are_the_papers():
    for dataset in IMAGENET_FAMILY:
        assert optim_preset(16, dataset).lr == 2e-4
    assert set(IMAGENET_FAMILY) == {"imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"}
    for shots, epochs in ((1, 100), (4, 100), (5, 200), (16, 200)):
        cfg = optim_preset(shots, "caltech101")
        assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.weight_decay) == (2e-3, epochs, 256, 5e-4)
        assert (cfg.optimizer, cfg.warmup_epochs, cfg.warmup_lr) == ("adam", 1, 1e-5)
    assert config_preset("oxford_flowers").alpha == 1.0
    assert config_preset("caltech101").alpha == 0.5 and config_preset("imagenet").alpha == 0.5
    default = TaskResConfig()
    assert (default.alpha, default.variant, default.learn_alpha, default.enhanced_base) == (0.5, "text", False, None)


@pytest.mark.parametrize(
    "kwargs, ok",
    [
        (dict(alpha=0.0), False),
        (dict(alpha=-1.0), False),
        (dict(alpha=1e-9), True),
        (dict(alpha=0.0, learn_alpha=True), True),
        (dict(alpha=float("nan"), learn_alpha=True), False),
        (dict(variant="both"), True),
        (dict(variant="residual"), False),
        (dict(base_weights="x.pth", enhance_base=True), False),
        (dict(search="val"), False),
        (dict(search="val", enhance_base=True), True),
        (dict(search="test", enhance_base=True), False),
        (dict(search="none", base_weights="x.pth"), True),
    ],
)
def test_taskres_config_bounds(kwargs, ok):
    if ok:
        TaskResConfig(**kwargs)
    else:
        with pytest.raises(TaskResError):
            TaskResConfig(**kwargs)


def test_enhanced_base_settings():
    cfg = TaskResConfig(enhance_base=True)
    assert cfg.enhanced_base.tune and cfg.enhanced_base.weights is None and cfg.enhanced_base.search == "val"
    cfg = TaskResConfig(base_weights="w.pth", search="none")
    assert not cfg.enhanced_base.tune and cfg.enhanced_base.weights == "w.pth" and cfg.enhanced_base.search == "none"


def test_fit_taskres_trains_the_residual_on_the_runs_views():
    ctx = cluster_context(optim=OptimConfig(lr=5e-2, epochs=4, batch_size=8))
    fitted = fit_taskres(ctx, TaskResConfig(alpha=0.5))
    assert isinstance(fitted, Fitted) and isinstance(fitted.head, TaskResHead)
    assert torch.equal(fitted.head.base_text_features, ctx.base)
    assert fitted.head.residual_mean_abs() > 0
    assert fitted.info == {"residual_mean_abs": fitted.head.residual_mean_abs()}
    assert fitted.extra_heads == {} and fitted.artifacts == []
    again = fit_taskres(cluster_context(optim=OptimConfig(lr=5e-2, epochs=4, batch_size=8)), TaskResConfig(alpha=0.5))
    assert torch.equal(again.head.text_feature_residuals, fitted.head.text_feature_residuals)
    other_seed = fit_taskres(
        cluster_context(
            optim=OptimConfig(lr=5e-2, epochs=4, batch_size=8), seed=0, **{"train_views": ctx.train_views.flip(0)}
        ),
        TaskResConfig(alpha=0.5),
    )
    assert not torch.equal(other_seed.head.text_feature_residuals, fitted.head.text_feature_residuals)


def test_context_train_uses_its_own_optim_or_the_given_one():
    ctx = cluster_context(optim=OptimConfig(lr=1e-2, epochs=3, batch_size=8))
    head = TaskResHead(ctx.base, ctx.logit_scale)
    records = []
    history = ctx.train(head, on_epoch=records.append)
    assert len(history) == 3 and records == history
    history = ctx.train(TaskResHead(ctx.base, ctx.logit_scale), optim=OptimConfig(lr=1e-2, epochs=2, batch_size=8))
    assert len(history) == 2
    assert ctx.has_val and not cluster_context(val_features=None).has_val
    assert not cluster_context(val_features=torch.zeros(0, 16)).has_val


def test_cosine_head_and_logits():
    g = torch.Generator().manual_seed(3)
    base, feats = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g) * 7
    head = CosineHead(base, 12.5)
    torch.testing.assert_close(head(feats), cos_logits(feats, base, 12.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cosine_logits(feats, base, 2.0), cos_logits(feats, base, 2.0), rtol=1e-5, atol=1e-5)
    base[0, 0] = 100.0  # the head keeps its own copy
    assert head.base_text_features[0, 0] != 100.0
    assert head.base_text_features.dtype == torch.float32 and float(head.logit_scale) == 12.5


def test_config_options_are_the_flagged_fields():
    @dataclasses.dataclass
    class Cfg:
        a: int = dataclasses.field(default=1, metadata=option("--a", "help a", metavar="N"))
        b: int = 2

    (field,) = config_options(Cfg)
    assert field.name == "a" and dict(field.metadata) == {"flag": "--a", "help": "help a", "metavar": "N"}


def brute_metrics(logits, labels, c):
    pred = [max(range(c), key=lambda j: (float(row[j]), -j)) for row in logits]
    right = [int(p == int(y)) for p, y in zip(pred, labels)]
    per = []
    for k in range(c):
        idx = [i for i, y in enumerate(labels) if int(y) == k]
        per.append(None if not idx else 100.0 * sum(right[i] for i in idx) / len(idx))
    scored = [p for p in per if p is not None]
    return 100.0 * sum(right) / len(right), sum(right), per, sum(scored) / len(scored)


def test_accuracy_metrics_by_brute_force():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(37, 4, generator=g)
    labels = torch.tensor([0, 1, 1, 2] * 9 + [1])  # label 3 has no test image
    acc, n_correct, per, mean = brute_metrics(logits, labels, 4)
    m = accuracy_metrics(logits, labels, ["a", "b", "b", "d"])
    assert m["accuracy"] == pytest.approx(acc) and m["n_correct"] == n_correct and m["n_test"] == 37
    assert [p["accuracy"] for p in m["per_class_accuracy"]] == pytest.approx(per)
    assert [p["n"] for p in m["per_class_accuracy"]] == [9, 19, 9, 0]
    assert [(p["label"], p["class"]) for p in m["per_class_accuracy"]] == [(0, "a"), (1, "b"), (2, "b"), (3, "d")]
    assert m["mean_per_class_accuracy"] == pytest.approx(mean)
    assert 0 < n_correct < 37 and m["mean_per_class_accuracy"] != pytest.approx(m["accuracy"])
    empty = accuracy_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), ["a", "b"])
    assert empty["n_test"] == 0 and empty["accuracy"] != empty["accuracy"] and empty["mean_per_class_accuracy"] == 0


def test_predict_logits_batches_and_evaluate():
    g = torch.Generator().manual_seed(6)
    base, feats = torch.randn(3, 5, generator=g), torch.randn(11, 5, generator=g)
    head = CosineHead(base, 10.0)
    head.train()
    full = cos_logits(feats, base, 10.0)
    for batch in (1, 4, 11, 4096):
        torch.testing.assert_close(predict_logits(head, feats, batch_size=batch), full, rtol=1e-5, atol=1e-5)
    assert not head.training
    assert predict_logits(head, feats[:0]).shape == (0, 0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    assert evaluate(head, feats, labels, ["x", "y", "z"]) == accuracy_metrics(full, labels, ["x", "y", "z"])


class ColumnsHead(Head):
    """A head with a tensor indexed by class on both dims (rows and columns), as Tip-Adapter's cache values."""

    class_rows = ("rows",)
    class_columns = ("columns",)

    def __init__(self, rows, columns):
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("columns", columns)

    def tensors(self):
        return {"rows": self.rows, "columns": self.columns}

    def metadata(self):
        return {"kind": "columns"}

    @classmethod
    def from_export(cls, tensors, meta):
        assert meta == {"kind": "columns"}
        return cls(tensors["rows"], tensors["columns"])


def test_select_classes_takes_rows_and_columns_in_the_given_order():
    rows, columns = torch.arange(12.0).reshape(4, 3), torch.arange(20.0).reshape(5, 4)
    sub = ColumnsHead(rows, columns).select_classes([3, 1])
    assert torch.equal(sub.rows, rows[[3, 1]]) and torch.equal(sub.columns, columns[:, [3, 1]])


def test_mean_per_class_accuracy_with_one_scored_class():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    m = accuracy_metrics(logits, torch.tensor([0, 0, 0]), ["a", "b"])  # only class a has test images
    assert m["mean_per_class_accuracy"] == pytest.approx(100.0 * 2 / 3) == pytest.approx(m["accuracy"])
