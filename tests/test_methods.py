"""What a method is (methods/base.py: heads, their export, the fit context, options; the registry) and the
comparison methods on small synthetic features and the tiny CLIP: identity at init, only the method's own parameters
change, searches pick the known best, independent re-derivations, and safe checkpoint reading."""

import ast
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cluster_context

from taskres.backbones import load_backbone
from taskres.config import TrainConfig
from taskres.engine import OptimConfig, fit
from taskres.errors import TaskResError, TaskResValueError
from taskres.methods import METHODS, get_method, registry
from taskres.methods.base import CosineHead, FitContext, Head, config_options, option
from taskres.methods.base import cosine_logits as zero_shot_logits
from taskres.methods.classifier_adapter import ClassifierAdapterConfig, ClassifierAdapterHead
from taskres.methods.clip_adapter import ClipAdapterConfig, ClipAdapterHead, fit_clip_adapter
from taskres.methods.coop import CoOpConfig, CoOpHead, PromptLearner, fit_coop, prompt_tokens
from taskres.methods.enhanced_base import (
    EnhancedBaseConfig,
    ProjectionHead,
    base_from_projection,
    enhanced_base,
    load_projection,
    pre_projection_features,
    save_projection,
)
from taskres.methods.linear_probe import (
    LinearProbeConfig,
    LinearProbeHead,
    fit_linear_probe,
    fit_logistic,
    search_c,
)
from taskres.methods.lp_plus_plus import LPPConfig, LPPHead
from taskres.methods.taskres import TaskResConfig, TaskResHead
from taskres.methods.tip_adapter import TipAdapterConfig, TipAdapterHead, fit_tip_adapter, grid, search_alpha_beta
from taskres.methods.tip_adapter_f import fit_tip_adapter_f
from taskres.methods.zs_lp import ZSLPHead
from taskres.text import build_base_classifier
from taskres.text_tower import check_text_tower, pooled_text, projection


def context(**kw) -> FitContext:
    return cluster_context(**kw)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


# ---- heads, their export, the fit context, options -----------------------------------------------------------------


def cos_logits(z, t, tau):
    """tau * cos, one pair at a time."""
    out = torch.empty(len(z), len(t))
    for i in range(len(z)):
        for j in range(len(t)):
            out[i, j] = tau * torch.dot(z[i], t[j]) / (z[i].norm() * t[j].norm())
    return out


def test_cosine_head_and_logits():
    g = torch.Generator().manual_seed(3)
    base, feats = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g) * 7
    head = CosineHead(base, 12.5)
    torch.testing.assert_close(head(feats), cos_logits(feats, base, 12.5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero_shot_logits(feats, base, 2.0), cos_logits(feats, base, 2.0), rtol=1e-5, atol=1e-5)
    base[0, 0] = 100.0  # the head keeps its own copy
    assert head.base_text_features[0, 0] != 100.0
    assert head.base_text_features.dtype == torch.float32 and float(head.logit_scale) == 12.5


def test_an_incomplete_head_fails_at_construction():
    class NoTensors(Head):
        def forward(self, image_features):
            return image_features

    class NoForward(Head):
        def tensors(self):
            return {}

    with pytest.raises(TypeError, match="abstract method.* tensors"):
        NoTensors()
    with pytest.raises(TypeError, match="abstract method.* forward"):
        NoForward()


def heads_with_known_metadata():
    """(head, its metadata exactly, keys in order): what classifier.safetensors holds for each head's layout."""
    g = torch.Generator().manual_seed(11)
    base, w, keys = (torch.randn(3, 4, generator=g) for _ in range(3))
    bias, alpha = torch.randn(3, generator=g), torch.randn(3, generator=g)
    tip = TipAdapterConfig(search="none", alpha=0.5, beta=2.0)
    probe, lpp = LinearProbeConfig(c=0.5, search="none"), LPPConfig(search="none")
    return [
        (CosineHead(base, 12.5), {"logit_scale": 12.5}),
        (ZSLPHead(base, 100.0), {"logit_scale": 100.0}),
        (
            TaskResHead(base, 30.0, TaskResConfig(alpha=0.7, variant="image", enhance_base=True)),
            {"alpha": pytest.approx(0.7), "variant": "image", "learn_alpha": False, "logit_scale": 30.0},
        ),
        (ClipAdapterHead(base, 100.0), {"ratio": 0.2, "reduction": 4, "logit_scale": 100.0}),
        (
            ClassifierAdapterHead(base, 100.0, ClassifierAdapterConfig(form="direct", reduction=2)),
            {"form": "direct", "alpha": 0.5, "reduction": 2, "logit_scale": 100.0},
        ),
        (
            CoOpHead(base, torch.randn(2, 5, generator=g), 100.0, CoOpConfig(n_ctx=2)),
            {"n_ctx": 2, "init_std": 0.02, "amp": True, "logit_scale": 100.0},
        ),
        (LinearProbeHead(w, bias, 0.5, probe), {"c": 0.5, "config": dataclasses.asdict(probe)}),
        (LPPHead(w, bias, alpha, base, lpp), {"config": dataclasses.asdict(lpp)}),
        (
            TipAdapterHead(base, keys, torch.eye(3), 100.0, 1.5, 2.5, config=tip),
            {"alpha": 1.5, "beta": 2.5, "logit_scale": 100.0, "config": dataclasses.asdict(tip)},
        ),
        (
            TipAdapterHead(base, keys, torch.eye(3), 100.0, 1.5, 2.5),
            {"alpha": 1.5, "beta": 2.5, "logit_scale": 100.0, "config": None},
        ),
    ]


@pytest.mark.parametrize("case", range(10))
def test_each_heads_metadata_and_its_round_trip_through_json(case):
    """The metadata Head builds from a head's declared scalars and config, key by key in order (the bytes of
    classifier.safetensors depend on both), and the head rebuilt from its JSON with every tensor and value."""
    head, expected = heads_with_known_metadata()[case]
    tensors, meta = head.export()
    assert meta == expected and list(meta) == list(expected)
    again = type(head).from_export(tensors, json.loads(json.dumps(meta)))
    tensors_again, meta_again = again.export()
    assert json.dumps(meta_again) == json.dumps(meta)
    assert list(tensors_again) == list(tensors)
    assert all(torch.equal(tensors_again[k], tensors[k]) for k in tensors)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(12))
    assert torch.equal(again(x), head(x))


def test_from_export_reads_older_metadata_and_refuses_a_tensor_of_another_shape():
    """A Tip-Adapter file without a config entry rebuilds with none (the constructor's default); a tensor copied
    into the head must have the head's shape (no silent broadcast)."""
    head, _ = heads_with_known_metadata()[-1]
    tensors, meta = head.export()
    del meta["config"]
    assert TipAdapterHead.from_export(tensors, meta).config is None
    zs_tensors, zs_meta = ZSLPHead(torch.randn(3, 4), 100.0).export()
    zs_tensors["prototypes"] = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"^prototypes is \(1, 4\); the head needs \(3, 4\)$"):
        ZSLPHead.from_export(zs_tensors, zs_meta)


class ColumnsHead(Head):
    """A head with a tensor indexed by class on both dims (rows and columns), as Tip-Adapter's cache values."""

    class_rows = ("rows",)
    class_columns = ("columns",)

    def __init__(self, rows, columns):
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("columns", columns)

    def forward(self, image_features):
        return image_features @ self.rows.t()

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


def test_config_options_are_the_flagged_fields():
    @dataclasses.dataclass
    class Cfg:
        a: int = dataclasses.field(default=1, metadata=option("--a", "help a", metavar="N"))
        b: int = 2

    (field,) = config_options(Cfg)
    assert field.name == "a" and dict(field.metadata) == {"flag": "--a", "help": "help a", "metavar": "N"}


def test_the_registry_does_not_import_its_package():
    """Discovery finds the method modules beside the registry: the registry imports no ``taskres.methods``, so the
    package and its registry form no import circle."""
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert "taskres.methods" not in imported and "taskres" not in imported


@pytest.mark.slow
@pytest.mark.parametrize("module", ["taskres.methods.registry", "taskres.methods"])
def test_a_fresh_process_imports_the_registry_or_the_package_with_every_method(module):
    code = f"import {module}; from taskres.methods.registry import METHODS; print(len(METHODS), next(iter(METHODS)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(len(METHODS)), "taskres"]


# ---- registry and presets ---------------------------------------------------------------------------------------


def test_registry_lists_every_method_with_a_summary():
    assert set(METHODS) == {
        "taskres",
        "linear-probe",
        "clip-adapter",
        "tip-adapter",
        "tip-adapter-f",
        "coop",
        "classifier-adapter",
        "lp++",
        "zs-lp",
        "clap",
        "zero-shot",
        "clip-lora",
    }
    assert all(spec.summary and spec.name == name for name, spec in METHODS.items())
    with pytest.raises(TaskResError, match="unknown method 'tip-adaptr'; did you mean 'tip-adapter'"):
        get_method("tip-adaptr")


@pytest.mark.parametrize(
    "method,shots,dataset,expect",
    [
        ("taskres", 4, "", dict(optimizer="adam", lr=2e-3, epochs=100, batch_size=256, weight_decay=5e-4)),
        ("taskres", 16, "", dict(optimizer="adam", epochs=200)),
        ("clip-adapter", 1, "", dict(optimizer="sgd", momentum=0.9, lr=2e-3, epochs=50, batch_size=32)),
        ("clip-adapter", 4, "", dict(epochs=100)),
        ("clip-adapter", 8, "imagenet", dict(epochs=200)),
        ("coop", 2, "", dict(optimizer="sgd", epochs=100, batch_size=32, weight_decay=5e-4)),
        ("coop", 16, "imagenet", dict(epochs=50)),
        (
            "tip-adapter-f",
            16,
            "dtd",
            dict(
                optimizer="adamw",
                lr=1e-3,
                eps=1e-4,
                weight_decay=0.01,
                epochs=20,
                batch_size=256,
                schedule="iteration",
                drop_last="never",
                warmup_epochs=0,
            ),
        ),
        ("tip-adapter-f", 16, "eurosat", dict(epochs=100)),
    ],
)
def test_optimiser_presets(method, shots, dataset, expect):
    optim = TrainConfig.preset(method, shots, 1, dataset).optim
    assert {k: getattr(optim, k) for k in expect} == expect


def test_training_free_methods_record_no_optimiser_and_linear_probe_needs_the_test_view():
    assert TrainConfig.preset("tip-adapter", 4, 1).optim is None
    config = TrainConfig.preset("linear-probe", 4, 1)
    assert config.optim is None and config.views == 0
    with pytest.raises(TaskResError, match="set `views` to 0"):
        TrainConfig(shots=4, seed=1, method="linear-probe", views=10)
    with pytest.raises(TaskResError, match="method 'coop' takes a CoOpConfig, got TaskResConfig"):
        TrainConfig(shots=4, seed=1, method="coop", method_config=TaskResConfig(enhance_base=True))


# ---- linear probe -----------------------------------------------------------------------------------------------


def reference_logistic(x, y, num_classes, c):
    """scikit-learn's objective, minimised independently: 0.5 * |W|^2 + C * sum CE(x W^T + b) (b not penalised)."""
    x, y = x.double(), y
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=5000, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w * w).sum() + c * F.cross_entropy(x @ w.t() + b, y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def test_fixed_c_linear_probe_matches_an_independent_derivation():
    ctx = context(c=3, d=6, shots=10, views=1)
    fitted = fit_linear_probe(ctx, LinearProbeConfig(c=0.5, search="none"))
    head = fitted.head
    w, b = reference_logistic(ctx.train_views[0], ctx.train_labels, 3, 0.5)
    x = ctx.val_features
    expected = (x.double() @ w.t() + b).softmax(1)
    # scikit-learn stops lbfgs at its default tolerance (tol 1e-4), so agreement is to about 1e-3
    torch.testing.assert_close(head(x).double().softmax(1), expected, atol=2e-3, rtol=0)
    assert torch.equal(head(x).argmax(1), expected.argmax(1))
    assert fitted.info["lp_c"] == 0.5


def test_two_class_probe_gives_the_logits_of_scikit_learn():
    ctx = context(c=2, d=5, shots=6, views=1)
    weight, bias = fit_logistic(ctx.train_views[0], ctx.train_labels, 2, 1.0)
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=1000).fit(ctx.train_views[0].double().numpy(), ctx.train_labels.numpy())
    probs = (ctx.val_features @ weight.t() + bias).softmax(1)
    np.testing.assert_allclose(probs.numpy(), clf.predict_proba(ctx.val_features.double().numpy()), atol=1e-5)


def test_c_search_finds_the_known_best():
    """A unimodal validation score peaked at log10 C = 1.3: the grid, then the bisection, close in on it."""
    chosen, tried = search_c(lambda c: -abs(math.log10(c) - 1.3), steps=8)
    assert abs(math.log10(chosen) - 1.3) < 0.02
    assert [c for c, _ in tried[:7]] == [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    assert len(tried) == 7 + 2 * 8
    assert tried[7][0] == pytest.approx(10.0) and tried[8][0] == pytest.approx(1000.0)


def test_linear_probe_search_runs_on_val_and_needs_it():
    ctx = context(views=1)
    fitted = fit_linear_probe(ctx, LinearProbeConfig())
    head = fitted.head
    assert len(fitted.info["lp_search"]) == 23 and fitted.info["lp_c"] == head.c
    again = get_method("linear-probe").head_cls.from_export(*head.export())
    assert torch.equal(again(ctx.val_features), head(ctx.val_features))
    with pytest.raises(TaskResError, match="set `search` none and a fixed `c`"):
        fit_linear_probe(context(views=1, val_features=None, val_labels=None), LinearProbeConfig())
    with pytest.raises(ValueError, match="set `search` none with it"):
        LinearProbeConfig(c=1.0)


# ---- Tip-Adapter -------------------------------------------------------------------------------------------------


def test_tip_adapter_with_zero_alpha_is_zero_shot():
    ctx = context()
    fitted = fit_tip_adapter(ctx, TipAdapterConfig(alpha=0.0, beta=5.0, search="none"))
    head = fitted.head
    assert torch.equal(head(ctx.val_features), zero_shot_logits(ctx.val_features, ctx.base, 100.0))


def test_tip_adapter_logits_match_an_independent_derivation():
    ctx = context(views=4)
    fitted = fit_tip_adapter(ctx, TipAdapterConfig(alpha=1.7, beta=5.5, search="none"))
    head = fitted.head
    x = ctx.val_features.double()
    keys = ctx.train_views.double().mean(0)
    keys = keys / keys.norm(dim=1, keepdim=True)
    f = x / x.norm(dim=1, keepdim=True)
    w = ctx.base.double() / ctx.base.double().norm(dim=1, keepdim=True)
    values = torch.zeros(len(ctx.train_labels), 3, dtype=torch.float64)
    values[torch.arange(len(ctx.train_labels)), ctx.train_labels] = 1.0
    expected = 100.0 * f @ w.t() + 1.7 * torch.exp(-5.5 * (1 - f @ keys.t())) @ values
    torch.testing.assert_close(head(ctx.val_features).double(), expected, atol=1e-3, rtol=1e-5)
    assert (head.alpha, head.beta) == (1.7, 5.5)


def test_tip_adapter_search_finds_the_known_best():
    """Zero-shot is wrong by margin 0.3 on both validation images, which are the cache keys themselves: the cache
    favours the right class by a * (1 - exp(-b)). The first b (0.1) fixes both once a > 0.3 / (1 - exp(-0.1))."""
    e = torch.eye(4)
    c = math.sqrt(1 / 0.3**2 - 1)  # cos(e0, normalise(e0 + c e3)) = 0.3
    base = torch.stack([e[1] + c * e[3], e[0] + c * e[3]])  # class 0 looks like image 1 and vice versa
    keys, values = e[:2], torch.eye(2)
    head = TipAdapterHead(base, keys, values, 1.0, 0.0, 0.0)
    config = TipAdapterConfig(search_scale=(5.0, 10.0), search_step=(10, 20))
    alpha, beta, acc = search_alpha_beta(head, e[:2], torch.tensor([0, 1]), config)
    alphas = grid(10.0, 20)
    expected_alpha = next(a for a in alphas if a * (1 - math.exp(-0.1)) > 0.3)
    assert (alpha, beta, acc) == (expected_alpha, 0.1, 100.0)
    assert expected_alpha == alphas[7]


def test_tip_adapter_search_matches_a_brute_force_search():
    ctx = context(c=4, d=8, shots=4, views=2, val=3, seed=3)
    config = TipAdapterConfig(search_scale=(7.0, 3.0), search_step=(15, 6))
    fitted = fit_tip_adapter(ctx, config)
    head = fitted.head
    best, found = -1, None
    for beta in grid(7.0, 15):
        for alpha in grid(3.0, 6):
            probe = TipAdapterHead(ctx.base, head.cache_keys, head.cache_values, 100.0, alpha, beta)
            correct = int((probe(ctx.val_features).argmax(1) == ctx.val_labels).sum())
            if correct > best:
                best, found = correct, (alpha, beta)
    assert (head.alpha, head.beta) == found
    assert fitted.info["tip_alpha"] == found[0] and fitted.info["tip_beta"] == found[1]


def test_tip_adapter_public_presets_and_errors():
    cfg = TipAdapterConfig.for_dataset("fgvc_aircraft")
    assert (cfg.init_beta, cfg.init_alpha, cfg.search_scale, cfg.search_step) == (1.0, 5.0, (30.0, 30.0), (200, 20))
    assert TipAdapterConfig.for_dataset("my_data").preset == "generic"
    with pytest.raises(TaskResError, match="set `search` none with them"):
        TipAdapterConfig(alpha=1.0)
    with pytest.raises(TaskResError, match="set `search` none"):
        fit_tip_adapter(context(val_features=None, val_labels=None), TipAdapterConfig())


def test_tip_adapter_f_trains_only_the_keys_and_keeps_the_best_val_epoch():
    records = []
    ctx = context(optim=get_method("tip-adapter-f").optim_preset(8, ""), on_epoch=records.append)
    ctx.optim = OptimConfig(**{**ctx.optim.__dict__, "epochs": 6, "lr": 5e-2})
    config = TipAdapterConfig(search_scale=(7.0, 3.0), search_step=(20, 10))
    cache_only = fit_tip_adapter(context(), config).head
    fitted = fit_tip_adapter_f(ctx, config)
    head = fitted.head
    assert torch.equal(head.base_text_features, cache_only.base_text_features)
    assert torch.equal(head.cache_values, cache_only.cache_values)
    assert not torch.equal(head.cache_keys, cache_only.cache_keys)
    assert [n for n, _ in head.named_parameters()] == ["cache_keys"]
    accs = [r["val_accuracy"] for r in records]
    assert len(accs) == 6 and fitted.info["tip_f_epoch"] == int(np.argmax(accs))
    at_init = TipAdapterHead(
        head.base_text_features, head.cache_keys, head.cache_values, 100.0, config.init_alpha, config.init_beta
    )
    val_acc = 100.0 * float((at_init(ctx.val_features).argmax(1) == ctx.val_labels).float().mean())
    assert val_acc == pytest.approx(max(accs))


# ---- CLIP-Adapter -----------------------------------------------------------------------------------------------


def test_clip_adapter_with_zero_ratio_is_zero_shot():
    ctx = context()
    head = ClipAdapterHead(ctx.base, 100.0, ClipAdapterConfig(ratio=0.0))
    assert torch.equal(head(ctx.val_features), zero_shot_logits(ctx.val_features, ctx.base, 100.0))


def test_clip_adapter_trains_only_the_mlp():
    ctx = context(d=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        before = state(ClipAdapterHead(ctx.base, 100.0))
    head = fit_clip_adapter(ctx, ClipAdapterConfig()).head
    assert changed(before, head) == {"adapter.0.weight", "adapter.2.weight"}
    assert head.adapter[0].weight.shape == (4, 16) and head.adapter[0].bias is None
    again = get_method("clip-adapter").head_cls.from_export(*head.export())
    assert torch.equal(again(ctx.val_features), head(ctx.val_features))
    assert torch.equal(again.select_classes([2, 0])(ctx.val_features), head(ctx.val_features)[:, [2, 0]])


# ---- CoOp (the tiny CLIP's text encoder in the loop) -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backbone(openai_rn_file):
    return load_backbone(str(openai_rn_file))


def test_prompt_learner_with_word_embeddings_is_the_text_encoder(tiny_backbone):
    """Context vectors equal to the embedding of "X" reproduce encode_text of "X X X X {name}." exactly."""
    names = ["red", "green_apple", "blue"]
    tokens = prompt_tokens(tiny_backbone, names, 4)
    x = tiny_backbone.model.token_embedding(tokens[0, 1:5]).detach()
    learner = PromptLearner(tiny_backbone.model, tokens, x.clone(), 100.0, amp=True)
    expected = tiny_backbone.encode_text(["X X X X red.", "X X X X green apple.", "X X X X blue."])
    torch.testing.assert_close(learner.text_features(), expected, rtol=0, atol=1e-6)
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]


def test_coop_trains_only_the_context_and_reloads_without_the_encoder(tiny_backbone):
    model_before = state(tiny_backbone.model)
    ctx = context(
        d=32,
        backbone=tiny_backbone,
        classnames=["red", "green", "blue"],
        optim=OptimConfig(lr=0.5, epochs=3, batch_size=8, optimizer="sgd"),
    )
    head = fit_coop(ctx, CoOpConfig(n_ctx=4)).head
    assert not changed(model_before, tiny_backbone.model)
    init = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    assert head.ctx.shape == (4, 64) and not torch.allclose(head.ctx, init)
    tokens = prompt_tokens(tiny_backbone, ctx.classnames, 4)
    with torch.no_grad():
        rebuilt = PromptLearner(tiny_backbone.model, tokens, head.ctx, 100.0, amp=True).text_features()
    torch.testing.assert_close(head.text_features, rebuilt)
    again = CoOpHead.from_export(*head.export())
    assert torch.equal(again(ctx.val_features), head(ctx.val_features))


def test_coop_prompt_that_does_not_fit_is_an_error(tiny_backbone):
    with pytest.raises(TaskResError, match="needs 20 tokens with 16 context vectors.*at most 12"):
        prompt_tokens(tiny_backbone, ["red"], 16)


def test_a_backbone_without_the_clip_text_tower_is_named_for_the_methods_that_need_it(tiny_backbone):
    """CoOp and TaskRes* rebuild the text tower: a model without it, or with a biased projection, is a clear error
    naming the backbone (it was an AttributeError)."""
    backbone = tiny_backbone
    assert check_text_tower(backbone, "coop") is backbone.model
    dim = backbone.model.text_projection.shape[0]
    biased = dataclasses.replace(backbone, model=torch.nn.Module())
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
        setattr(biased.model, name, getattr(backbone.model, name))
    biased.model.text_projection = torch.nn.Linear(dim, 4, bias=True)
    with pytest.raises(TaskResValueError, match=r"coop replaces the text projection, but backbone '.*tiny-rn\.pt'"):
        check_text_tower(biased, "coop")
    bare = dataclasses.replace(backbone, model=torch.nn.Module())
    with pytest.raises(TaskResValueError, match=r"needs a CLIP text transformer .* backbone '.*tiny-rn\.pt' has"):
        check_text_tower(bare, "coop")


# ---- TaskRes*: the enhanced base --------------------------------------------------------------------------------


def test_enhanced_base_with_the_original_projection_is_the_regular_base(tiny_backbone):
    names, templates = ["red", "green_apple"], ["a photo of a {}.", "itap of a {}."]
    pre = pre_projection_features(tiny_backbone, names, templates)
    assert pre.shape == (2, 2, 64)
    regular = build_base_classifier(tiny_backbone, names, templates)
    torch.testing.assert_close(base_from_projection(pre, projection(tiny_backbone.model)), regular, rtol=0, atol=1e-6)


def strong_base_file(path, proj):
    """The released strong_base layout: a linear layer's (D, W) weight, next to pickled optimiser and scheduler."""
    layer = torch.nn.Linear(proj.shape[0], proj.shape[1], bias=False)
    with torch.no_grad():
        layer.weight.copy_(proj.t())
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)
    layer(torch.randn(2, proj.shape[0])).sum().backward()
    opt.step()
    with torch.no_grad():
        layer.weight.copy_(proj.t())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50)
    torch.save(
        {
            "state_dict": {"weight": layer.weight.detach().clone()},
            "epoch": 50,
            "optimizer": opt,
            "scheduler": sched,
            "val_result": None,
        },
        path,
    )
    with pytest.raises(pickle.UnpicklingError):  # what torch's plain safe loading does with it
        torch.load(path, weights_only=True)


def test_strong_base_layout_round_trip(tmp_path, tiny_backbone):
    proj = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    strong_base_file(tmp_path / "model.pth.tar", proj)
    assert torch.equal(load_projection(tmp_path / "model.pth.tar"), proj)
    save_projection(tmp_path / "p.safetensors", proj, {"dataset": "x"})
    assert torch.equal(load_projection(tmp_path / "p.safetensors"), proj)
    ctx = context(c=2, d=32, backbone=tiny_backbone, classnames=["red", "blue"])
    base, used, info = enhanced_base(ctx, EnhancedBaseConfig(weights=str(tmp_path / "model.pth.tar")))
    assert torch.equal(used, proj) and len(info["base_weights_sha256"]) == 64
    pre = pre_projection_features(tiny_backbone, ["red", "blue"], ["a photo of a {}."])
    torch.testing.assert_close(base, base_from_projection(pre, proj))


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pth.tar"
    torch.save({"state_dict": {"weight": torch.zeros(32, 64)}, "optimizer": Payload()}, path)
    with pytest.raises(TaskResError, match=r"model.pth.tar' is refused: its pickle calls '(posix|nt|os)\.system'"):
        load_projection(path)
    assert not marker.exists()
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(TaskResError, match="junk.pth.tar' cannot be read safely"):
        load_projection(tmp_path / "junk.pth.tar")


def test_enhanced_base_applies_in_every_precision(openai_rn_file, tmp_path):
    """The official code applies the projection only in fp16; here a doubled projection doubles the base in bf16."""
    bb = load_backbone(str(openai_rn_file), precision="bf16")
    proj = projection(bb.model).detach().float() * 2
    save_projection(tmp_path / "p.safetensors", proj, {})
    ctx = context(c=2, d=32, backbone=bb, classnames=["red", "blue"])
    base, _, _ = enhanced_base(ctx, EnhancedBaseConfig(weights=str(tmp_path / "p.safetensors")))
    pre = pre_projection_features(bb, ["red", "blue"], ["a photo of a {}."])
    torch.testing.assert_close(base, 2 * base_from_projection(pre, projection(bb.model).float()))


def test_tuning_the_projection_changes_only_the_projection(tiny_backbone):
    pre = pre_projection_features(tiny_backbone, ["red", "green", "blue"], ["a photo of a {}."])
    proj0 = projection(tiny_backbone.model).detach().float()
    head = ProjectionHead(pre, proj0, 100.0)
    before = state(head)
    ctx = context(d=32, backbone=tiny_backbone, classnames=["red", "green", "blue"])
    fit(head, ctx.train_views, ctx.train_labels, EnhancedBaseConfig(tune=True).optim(1e-3), seed=0, quiet=True)
    assert changed(before, head) == {"text_projection"}
    base, proj, info = enhanced_base(ctx, EnhancedBaseConfig(tune=True, epochs=3))
    search = info["enhanced_base_search"]
    assert [s["lr"] for s in search] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    best = max(s["val_accuracy"] for s in search)
    assert info["enhanced_base_lr"] == next(s["lr"] for s in search if s["val_accuracy"] == best)
    torch.testing.assert_close(base, base_from_projection(pre, proj))
    assert info["text_projection_change"] > 0
    _, _, info = enhanced_base(ctx, EnhancedBaseConfig(tune=True, epochs=2, search="none"))
    assert info["enhanced_base_lr"] == 1e-3 and len(info["enhanced_base_search"]) == 1


def test_pooled_text_then_projection_is_encode_text(tiny_backbone):
    tokens = tiny_backbone.tokenizer(["a photo of a red.", "blue"])
    assert torch.equal(
        pooled_text(tiny_backbone.model, tokens) @ projection(tiny_backbone.model),
        tiny_backbone.model.encode_text(tokens),
    )
