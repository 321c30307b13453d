"""The TaskRes paper's Table 2 classifiers: phi on the rows of the text classifier, residual or direct."""

import pytest
import torch
from conftest import fit_context

from taskres.engine import OptimConfig
from taskres.methods.base import cosine_logits
from taskres.methods.classifier_adapter import ClassifierAdapterConfig, ClassifierAdapterHead, fit_classifier_adapter


def context(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 16, generator=g)
    labels = torch.arange(4).repeat_interleave(3)
    feats = base[labels] * 0.2 + torch.randn(12, 16, generator=g)
    return fit_context(
        base=base,
        logit_scale=50.0,
        train_views=feats,
        train_labels=labels,
        val_features=None,
        val_labels=None,
        optim=OptimConfig(lr=1e-2, epochs=5, batch_size=4),
        seed=seed,
        quiet=True,
    )


@pytest.mark.parametrize("form", ["residual", "direct"])
def test_forms_shapes_and_only_phi_changes(form):
    ctx = context()
    config = ClassifierAdapterConfig(form=form, alpha=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        before = ClassifierAdapterHead(ctx.base, 50.0, config)
    state = {k: v.clone() for k, v in before.state_dict().items()}
    head = fit_classifier_adapter(ctx, config).head
    assert head.adapter[0].weight.shape == (4, 16) and head.adapter[2].weight.shape == (16, 4)
    assert head.adapter[0].bias is None and head.classifier().shape == (4, 16)
    changed = {k for k, v in head.state_dict().items() if not torch.equal(state[k], v)}
    assert changed == {"adapter.0.weight", "adapter.2.weight"}
    t = ctx.base
    phi = head.adapter(t)
    expected = t + 0.5 * phi if form == "residual" else phi
    torch.testing.assert_close(head.classifier(), expected)
    x = torch.randn(5, 16)
    torch.testing.assert_close(head(x), cosine_logits(x, expected, 50.0))


def test_the_direct_form_is_not_the_identity_and_the_residual_form_keeps_t():
    ctx = context()
    direct = ClassifierAdapterHead(ctx.base, 50.0, ClassifierAdapterConfig(form="direct"))
    assert not torch.allclose(direct.classifier(), ctx.base)
    residual = ClassifierAdapterHead(ctx.base, 50.0, ClassifierAdapterConfig(form="residual"))
    with torch.no_grad():
        residual.adapter[2].weight.zero_()  # phi = 0: the residual form is then exactly t
    assert torch.equal(residual.classifier(), ctx.base)


def test_bad_config():
    with pytest.raises(ValueError, match="^form must be one of residual, direct"):
        ClassifierAdapterConfig(form="both")
