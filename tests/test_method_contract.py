"""The contract every registered method keeps, run over the registry: a new method gets these tests by adding one
line to NEEDS (what its fit needs) below, or none.

- identity with zero-shot CLIP at initialisation, for methods that promise it (``init_head``);
- the export round trip gives the same logits, class selection gives the selected columns;
- training changes the method's own tensors only: the frozen base classifier and the backbone stay as they were;
- what it learned beats zero-shot CLIP on a separable set; zero-shot CLIP itself, the baseline (a registered method
  that learns nothing), gives exactly the base classifier's logits instead.
"""

import pytest
import torch
from conftest import fit_context

from taskres.engine import OptimConfig
from taskres.methods import METHODS, FitContext, cosine_logits
from taskres.text import build_base_classifier

# Per method, what its fit needs beyond cached features (the backbone in the loop; a config for the tiny model).
NEEDS = {
    "coop": {"backbone": True, "config": {"n_ctx": 4}},
}
ZERO_SHOT = "zero-shot"  # the baseline: it learns nothing, by definition
# methods that train through the encoders (CLIP-LoRA) need images, not cached features: their contract is in
# tests/test_clip_lora.py (test_encoder_method_contract), over the same registry
FEATURE_METHODS = sorted(m for m in METHODS if METHODS[m].adapt_backbone is None)
LEARNING = sorted(m for m in FEATURE_METHODS if m != ZERO_SHOT)


def make_context(method, backbone, seed=0) -> FitContext:
    """Three separable classes in the tiny model's feature space (D = 32), a base from its text tower."""
    g = torch.Generator().manual_seed(seed)
    classnames = ["red", "green", "blue"]
    base = build_base_classifier(backbone, classnames, ["a photo of a {}."])  # (3, 32)
    centres = torch.randn(3, 32, generator=g) * 3
    labels = torch.arange(3).repeat_interleave(4)
    views = torch.stack([centres[labels] + torch.randn(12, 32, generator=g) for _ in range(2)])  # (2, 12, 32)
    if METHODS[method].test_view_only:
        views = views[:1]
    val_labels = torch.arange(3).repeat_interleave(2)
    val = centres[val_labels] + torch.randn(6, 32, generator=g)
    optim = OptimConfig(lr=5e-2, epochs=3, batch_size=4) if METHODS[method].trained else None
    return fit_context(
        base=base,
        logit_scale=100.0,
        train_views=views,
        train_labels=labels,
        val_features=val,
        val_labels=val_labels,
        optim=optim,
        seed=seed,
        classnames=classnames,
        templates=["a photo of a {}."],
        shots=4,
        dataset="tiny",
        backbone=backbone if NEEDS.get(method, {}).get("backbone") else None,
        quiet=True,
    )


def config_for(method):
    spec = METHODS[method]
    return spec.configure(spec.default_config(), **NEEDS.get(method, {}).get("config", {}))


def test_the_registry_knows_the_builtin_methods():
    assert {"taskres", "linear-probe", "clip-adapter", "tip-adapter", "tip-adapter-f", "coop"} <= set(METHODS)
    assert all(spec.summary and spec.name == name for name, spec in METHODS.items())


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m].init_head is not None))
def test_identity_with_zero_shot_at_initialisation(method, tiny):
    ctx = make_context(method, tiny)
    head = METHODS[method].init_head(ctx, config_for(method))
    assert torch.equal(head(ctx.val_features), cosine_logits(ctx.val_features, ctx.base, 100.0))


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_export_round_trip_and_class_selection(method, tiny):
    ctx = make_context(method, tiny)
    head = METHODS[method].fit(ctx, config_for(method)).head
    x = ctx.val_features
    tensors, meta = head.export()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors.values())
    again = METHODS[method].head_cls.from_export(tensors, meta)
    assert torch.equal(again(x), head(x))
    logits = head(x)
    assert logits.shape == (6, 3) and torch.isfinite(logits).all()
    assert torch.equal(head.select_classes([2, 0])(x), logits[:, [2, 0]])


def test_the_context_carries_its_features_and_shows_test_only_for_public_selection(tiny):
    ctx = make_context("taskres", tiny)
    assert ctx.train_views is ctx.features.train_views and ctx.val_features is ctx.features.val
    assert ctx.test_features is None and ctx.test_labels is None and ctx.full_val_features is None
    ctx.public_selection = True  # the official protocol of a method whose public code selects on test
    assert ctx.test_features is ctx.features.test and ctx.test_labels is ctx.features.test_labels


def test_zero_shot_is_the_base_classifier_as_it_is(tiny):
    ctx = make_context(ZERO_SHOT, tiny)
    fitted = METHODS[ZERO_SHOT].fit(ctx, config_for(ZERO_SHOT))
    assert not METHODS[ZERO_SHOT].trained and fitted.info == {} and fitted.artifacts == []
    assert torch.equal(fitted.head(ctx.val_features), cosine_logits(ctx.val_features, ctx.base, 100.0))
    assert torch.equal(fitted.head.export()[0]["base_text_features"], ctx.base)


@pytest.mark.parametrize("method", LEARNING)
def test_training_changes_only_the_methods_own_tensors(method, tiny):
    ctx = make_context(method, tiny)
    backbone_before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    base_before = ctx.base.clone()
    head = METHODS[method].fit(ctx, config_for(method)).head
    tensors, _ = head.export()
    for name in head.frozen_tensors:
        assert torch.equal(tensors[name], base_before), name
    assert torch.equal(ctx.base, base_before)
    assert all(torch.equal(v, backbone_before[k]) for k, v in tiny.model.state_dict().items())
    # What the method learned differs from zero-shot CLIP on the validation features.
    assert not torch.equal(head(ctx.val_features), cosine_logits(ctx.val_features, base_before, 100.0))


@pytest.mark.parametrize("method", LEARNING)
def test_tuned_beats_zero_shot_on_a_separable_set(method, tiny):
    """Well-separated class clusters and a base that ignores them: every method ends above zero-shot on held-out
    points of the clusters."""
    ctx = make_context(method, tiny, seed=1)
    if ctx.optim is not None:
        ctx.optim = OptimConfig(**{**ctx.optim.__dict__, "epochs": 60})
    g = torch.Generator().manual_seed(5)
    centres = ctx.train_views[0].reshape(3, 4, -1).mean(dim=1)  # (3, 32)
    labels = torch.arange(3).repeat_interleave(20)
    held_out = centres[labels] + 0.5 * torch.randn(60, 32, generator=g)
    head = METHODS[method].fit(ctx, config_for(method)).head

    def accuracy(logits):
        return float((logits.argmax(1) == labels).float().mean())

    zero_shot = accuracy(cosine_logits(held_out, ctx.base, 100.0))
    tuned = accuracy(head(held_out))
    assert zero_shot < 0.9 and tuned > zero_shot, (zero_shot, tuned)
