"""TaskRes (methods/taskres.py) against the paper's formula written out here: logits = tau * cos(z + alpha r,
t + alpha x), zero-shot CLIP at initialisation, only the residuals train, the export keeps every number, the paper's
presets, the whole message and parameter of every refused setting; and TaskRes*, the enhanced base evaluated beside
the trained head, against the text encoder's output computed here, with the text_projection.safetensors file that
--enhance-base writes (docs/mutation.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cluster_context
from safetensors import safe_open

from taskres.config import TrainConfig
from taskres.engine import OptimConfig, fit
from taskres.errors import TaskResError
from taskres.methods import get_method
from taskres.methods.base import Fitted, cosine_logits
from taskres.methods.enhanced_base import load_projection, save_projection
from taskres.methods.taskres import (
    IMAGENET_FAMILY,
    TaskResConfig,
    TaskResHead,
    config_preset,
    fit_taskres,
    init_head,
    optim_preset,
)
from taskres.text_tower import pooled_text, projection


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


def problem(n=24, c=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(c, d, generator=g) * 3
    feats = torch.randn(n, d, generator=g) * 2
    labels = torch.arange(n) % c
    return base, feats, labels


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


@pytest.mark.parametrize("variant", ["text", "image", "both"])
@pytest.mark.parametrize("learn_alpha", [False, True])
def test_identity_at_init(variant, learn_alpha):
    base, feats, _ = problem()
    head = TaskResHead(base, 100.0, TaskResConfig(alpha=0.5, variant=variant, learn_alpha=learn_alpha))
    expected = 100.0 * torch.nn.functional.normalize(feats, dim=-1) @ torch.nn.functional.normalize(base, dim=-1).t()
    assert torch.equal(head(feats), cosine_logits(feats, base, 100.0))
    torch.testing.assert_close(head(feats), expected, rtol=0, atol=1e-5)


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
    """The residuals (and a learned alpha) are the head's only parameters, and training changes them and nothing
    else: not the base, not the logit scale, not a fixed alpha."""
    head, base = trained_head(variant, learn_alpha=learn_alpha)
    expected = params | ({"alpha"} if learn_alpha else set())
    assert {n for n, p in head.named_parameters() if p.requires_grad} == expected
    assert {n for n, _ in head.named_parameters()} == expected
    assert set(head.state_dict()) >= {"base_text_features", "text_feature_residuals", "alpha", "logit_scale"}
    assert float(head.alpha.detach()) == pytest.approx(0.7)
    g = torch.Generator().manual_seed(2)
    feats, labels = torch.randn(24, 8, generator=g) * 2, torch.arange(24) % 4
    before = {k: v.clone() for k, v in head.state_dict().items()}
    fit(head, feats, labels, OptimConfig(lr=1e-2, epochs=5, batch_size=8), seed=0, quiet=True)
    after = head.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == expected
    assert torch.equal(after["base_text_features"], base)
    assert torch.isfinite(head(feats)).all()


def test_training_improves_the_fit():
    base, feats, labels = problem()
    head = TaskResHead(base, 100.0)
    loss0 = torch.nn.functional.cross_entropy(head(feats), labels).item()
    fit(head, feats, labels, OptimConfig(lr=5e-2, epochs=100, batch_size=256), seed=0, quiet=True)
    assert torch.nn.functional.cross_entropy(head(feats), labels).item() < loss0 * 0.5


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


def test_taskres_export_round_trip_keeps_every_number():
    head, base = trained_head("both", alpha=0.3, learn_alpha=True)
    with torch.no_grad():
        head.alpha.fill_(0.45)  # a learned alpha moved away from its initial value
    tensors, meta = head.export()
    assert meta == {"alpha": pytest.approx(0.45), "variant": "both", "learn_alpha": True, "logit_scale": 30.0}
    assert set(tensors) == {"base_text_features", "text_feature_residuals", "image_feature_residual"}
    assert tensors["text_feature_residuals"].shape == base.shape and tensors["image_feature_residual"].shape == (1, 8)
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
    pets = TrainConfig.preset("taskres", shots=16, seed=1, dataset="oxford_pets")
    assert (pets.optim.lr, pets.optim.epochs, pets.method_config.alpha) == (2e-3, 200, 0.5)
    imagenet = TrainConfig.preset("taskres", shots=4, seed=1, dataset="imagenet").optim
    assert (imagenet.lr, imagenet.epochs) == (2e-4, 100)
    assert TrainConfig.preset("taskres", shots=1, seed=1, dataset="oxford_flowers").method_config.alpha == 1.0


# ---- settings ---------------------------------------------------------------------------------------------------


def refused(param, message, **kwargs):
    with pytest.raises(TaskResError) as err:
        TaskResConfig(**kwargs)
    assert str(err.value) == message
    assert err.value.param == param and isinstance(err.value, ValueError)


def test_every_refused_setting_says_what_and_which_parameter():
    refused("alpha", "alpha must be a finite number (the residual scale); got nan.", alpha=math.nan)
    refused("alpha", "alpha must be a finite number (the residual scale); got inf.", alpha=math.inf)
    refused("alpha", "alpha must be a finite number (the residual scale); got nan.", alpha=math.nan, learn_alpha=True)
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
    refused("variant", "variant must be one of text, image, both; got 'texts'.", variant="texts")
    assert TaskResConfig(alpha=0.0, learn_alpha=True).alpha == 0.0  # a learned alpha may start at 0
    for accepted in (
        dict(alpha=1e-9),
        dict(variant="both"),
        dict(search="val", enhance_base=True),
        dict(search="none", base_weights="x.pth"),
    ):
        TaskResConfig(**accepted)


def test_check_reads_the_base_weights_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TaskResError) as err:
        TaskResConfig(base_weights=str(missing)).check()
    assert isinstance(err.value, FileNotFoundError)
    assert str(err.value).startswith(f"--base-weights file {str(missing)!r} does not exist;")
    save_projection(tmp_path / "p.safetensors", torch.ones(4, 2), {})
    TaskResConfig(base_weights=str(tmp_path / "p.safetensors")).check()  # a readable file passes
    TaskResConfig().check()  # nothing to read


def test_enhanced_base_settings():
    cfg = TaskResConfig(enhance_base=True)
    assert cfg.enhanced_base.tune and cfg.enhanced_base.weights is None and cfg.enhanced_base.search == "val"
    cfg = TaskResConfig(base_weights="w.pth", search="none")
    assert not cfg.enhanced_base.tune and cfg.enhanced_base.weights == "w.pth" and cfg.enhanced_base.search == "none"


# ---- TaskRes*: the enhanced base --------------------------------------------------------------------------------


NAMES = ["red", "green", "blue"]


TEMPLATES = ["a photo of a {}.", "itap of a {}."]


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


def test_the_text_projection_file_has_deterministic_bytes(tmp_path):
    """An identical TaskRes* run writes an identical text_projection.safetensors (the safetensors library writes
    its metadata in a random order)."""
    from taskres.methods.enhanced_base import save_projection

    proj = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    meta = {"backbone": "{}", "dataset": "d", "shots": "4", "seed": "1"}
    files = []
    for i in range(6):
        save_projection(tmp_path / f"p{i}.safetensors", proj, dict(meta))
        files.append((tmp_path / f"p{i}.safetensors").read_bytes())
    assert len(set(files)) == 1
