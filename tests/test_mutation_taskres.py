"""TaskRes's settings and TaskRes* (docs/mutation.md): the whole message and parameter of every refused setting; the
head before training; the enhanced base that TaskRes* evaluates beside the trained head, against the text encoder's
output computed here; the text_projection.safetensors file that --enhance-base writes, with its metadata."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cluster_context
from safetensors import safe_open

from taskres.engine import OptimConfig
from taskres.errors import TaskResError
from taskres.methods import get_method
from taskres.methods.base import cosine_logits
from taskres.methods.enhanced_base import load_projection, save_projection
from taskres.methods.taskres import TaskResConfig, TaskResHead, fit_taskres, init_head
from taskres.text_tower import pooled_text, projection

NAMES = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {}.", "itap of a {}."]


def refused(param, message, **kwargs):
    with pytest.raises(TaskResError) as err:
        TaskResConfig(**kwargs)
    assert str(err.value) == message
    assert err.value.param == param


def test_every_refused_setting_says_what_and_which_parameter():
    refused("alpha", "alpha must be a finite number (the residual scale); got nan.", alpha=math.nan)
    refused("alpha", "alpha must be a finite number (the residual scale); got inf.", alpha=math.inf)
    refused("alpha", "alpha must be > 0 (the residual scale); got 0.0.", alpha=0.0)
    refused("alpha", "alpha must be > 0 (the residual scale); got -0.5.", alpha=-0.5)
    refused(
        "base_weights",
        "pass either `base_weights` (a released or saved projection) or `enhance_base` (tune one now), not both.",
        base_weights="p.safetensors",
        enhance_base=True,
    )
    refused("search", "search must be one of val, none; got 'test'.", search="test", enhance_base=True)
    refused(
        "search",
        "`search` applies to taskres only with `enhance_base` (it picks the base's lr).",
        search="val",
    )
    assert TaskResConfig(alpha=0.0, learn_alpha=True).alpha == 0.0  # a learned alpha may start at 0


def test_check_reads_the_base_weights_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TaskResError) as err:
        TaskResConfig(base_weights=str(missing)).check()
    assert isinstance(err.value, FileNotFoundError)
    assert str(err.value).startswith(f"--base-weights file {str(missing)!r} does not exist;")
    save_projection(tmp_path / "p.safetensors", torch.ones(4, 2), {})
    TaskResConfig(base_weights=str(tmp_path / "p.safetensors")).check()  # a readable file passes
    TaskResConfig().check()  # nothing to read


def test_the_head_before_training_is_zero_shot_clip_with_the_given_settings():
    ctx = cluster_context(d=8)
    config = TaskResConfig(alpha=0.7, variant="both")
    for head in (init_head(ctx, config), get_method("taskres").init_head(ctx, config)):
        assert isinstance(head, TaskResHead)
        assert head.metadata() == {
            "alpha": pytest.approx(0.7),
            "variant": "both",
            "learn_alpha": False,
            "logit_scale": 100.0,
        }
        assert head.image_feature_residual is not None
        torch.testing.assert_close(head(ctx.val_features), cosine_logits(ctx.val_features, ctx.base, 100.0))


def regular_base(tiny):
    """(C, D) mean over the templates of CLIP's un-normalised text features."""
    with torch.no_grad():
        return torch.stack(
            [tiny.model.encode_text(tiny.tokenizer([t.format(n) for t in TEMPLATES])).float().mean(0) for n in NAMES]
        )


def star_context(tiny, **kw):
    return cluster_context(
        d=32,
        backbone=tiny,
        classnames=NAMES,
        templates=TEMPLATES,
        dataset="tiny",
        shots=8,
        seed=3,
        optim=OptimConfig(lr=1e-2, epochs=3, batch_size=8),
        **kw,
    )


def test_taskres_star_from_a_file_evaluates_the_enhanced_base_beside_the_trained_head(tiny, tmp_path):
    doubled = projection(tiny.model).detach().float() * 2  # the base is linear in the projection
    save_projection(tmp_path / "p.safetensors", doubled, {})
    ctx = star_context(tiny)
    config = TaskResConfig(alpha=0.6, variant="both", base_weights=str(tmp_path / "p.safetensors"))
    fitted = fit_taskres(ctx, config)
    expected = 2 * regular_base(tiny)
    assert list(fitted.extra_heads) == ["enhanced_base"]
    enhanced = fitted.extra_heads["enhanced_base"]
    torch.testing.assert_close(enhanced.base_text_features, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enhanced(ctx.val_features), cosine_logits(ctx.val_features, expected, 100.0))
    assert enhanced.metadata()["logit_scale"] == 100.0
    head = fitted.head
    torch.testing.assert_close(head.base_text_features, expected, rtol=1e-5, atol=1e-5)  # trained on that base
    assert head.metadata() == {
        "alpha": pytest.approx(0.6),
        "variant": "both",
        "learn_alpha": False,
        "logit_scale": 100.0,
    }
    assert head.text_feature_residuals.abs().sum() > 0
    assert fitted.artifacts == []  # the file given is not written again
    assert fitted.info["text_projection_change"] == pytest.approx(1.0)
    assert fitted.info["residual_mean_abs"] == pytest.approx(float(head.text_feature_residuals.detach().abs().mean()))


def test_enhance_base_writes_the_tuned_projection_with_its_run(tiny, tmp_path):
    ctx = star_context(tiny)
    fitted = fit_taskres(ctx, TaskResConfig(enhance_base=True, search="none"))
    assert len(fitted.artifacts) == 1
    artifact = fitted.artifacts[0]
    assert (artifact.filename, artifact.metrics_key) == ("text_projection.safetensors", "text_projection_file")
    path = tmp_path / artifact.filename
    artifact.write(path)
    tuned = load_projection(path)
    original = projection(tiny.model).detach().float()
    assert tuned.shape == original.shape and not torch.equal(tuned, original)
    assert fitted.info["text_projection_change"] == pytest.approx(
        float((tuned - original).norm() / original.norm()), rel=1e-5
    )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["backbone"]) == tiny.identity.to_json()
    assert (meta["dataset"], meta["shots"], meta["seed"]) == ("tiny", "8", "3")
    # The enhanced base (evaluated beside the head, and the head's own base) is the one of the saved projection.
    with torch.no_grad():
        expected = torch.stack(
            [
                (pooled_text(tiny.model, tiny.tokenizer([t.format(n) for t in TEMPLATES])).float() @ tuned).mean(0)
                for n in NAMES
            ]
        )
    torch.testing.assert_close(fitted.extra_heads["enhanced_base"].base_text_features, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fitted.head.base_text_features, expected, rtol=1e-5, atol=1e-5)
