"""LP++, ZS-LP and CLAP on small synthetic features: presets, independent re-derivations of LP++'s initialisation and
step sizes and of CLAP's penalty weights, the order of updates, only the method's own tensors change, and the CLI
end to end (train, eval, predict)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cluster_context
from conftest import run_cli as run

from taskres.config import TrainConfig
from taskres.engine import OptimConfig
from taskres.errors import TaskResError
from taskres.methods import METHODS, get_method
from taskres.methods.base import FitContext, cosine_logits
from taskres.methods.clap import CLAPConfig, class_penalty, fit_clap, penalty_weights
from taskres.methods.lp_plus_plus import LPPConfig, LPPHead, fit_lpp, initial_alpha, step_size_alpha, step_size_w
from taskres.methods.zs_lp import ZSLPConfig, ZSLPHead, batches_per_epoch, fit_zs_lp


def context(d=8, shots=4, views=1, val=3, optim=None, **kw) -> FitContext:
    """Class clusters (conftest.cluster_context) in 8 dimensions, one view, no optimiser preset."""
    return cluster_context(d=d, shots=shots, views=views, val=val, optim=optim, **kw)


# ---- registry and presets -----------------------------------------------------------------------------------------


def test_the_three_are_registered_with_their_public_defaults():
    assert {"lp++", "zs-lp", "clap"} <= set(METHODS)
    assert get_method("lp++").views == 1 and not get_method("lp++").trained
    assert get_method("zs-lp").views == 20 and get_method("clap").views == 20
    assert get_method("zs-lp").init_head is not None and get_method("clap").init_head is not None
    assert LPPConfig().epochs == 300 and LPPConfig().alpha_every == 10 and LPPConfig().search == "val"


@pytest.mark.parametrize("method", ["zs-lp", "clap"])
@pytest.mark.parametrize("shots,dataset", [(1, ""), (16, "imagenet"), (4, "eurosat")])
def test_clap_optimiser_is_one_setting_for_every_task(method, shots, dataset):
    optim = TrainConfig.preset(method, shots, 1, dataset).optim
    assert optim == OptimConfig(
        lr=0.1,
        epochs=300,
        batch_size=256,
        weight_decay=0.0,
        optimizer="sgd",
        momentum=0.9,
        warmup_epochs=1,
        warmup_lr=1e-5,
    )


def test_lpp_takes_no_optimiser_settings():
    assert TrainConfig.preset("lp++", 4, 1).optim is None
    with pytest.raises(TaskResError, match="training-free"):
        TrainConfig.resolve("lp++", 4, 1, optim={"lr": 0.1})
    with pytest.raises(TaskResError, match="set `search` none"):
        fit_lpp(context(val_features=None, val_labels=None), LPPConfig())


# ---- LP++ ---------------------------------------------------------------------------------------------------------


def test_lpp_step_sizes_and_initialisation_match_an_independent_derivation():
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(10, 5, generator=g), dim=-1).double()
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    text = F.normalize(torch.randn(3, 5, generator=g), dim=-1).double()
    # lambda_max of F^T F is the squared largest singular value of F
    sigma = torch.linalg.svdvals(feats)[0].item()
    assert step_size_w(feats) == pytest.approx(4 * 10 / sigma**2, rel=1e-10)
    per_class = [sum(float(feats[i] @ text[c]) ** 2 for i in range(10)) for c in range(3)]
    assert step_size_alpha(feats, text) == pytest.approx(10 / (4 * max(per_class)), rel=1e-10)
    own = [
        sum(float(feats[i] @ text[c]) for i in range(10) if labels[i] == c) / int((labels == c).sum()) for c in range(3)
    ]
    assert initial_alpha(feats, labels, text) == pytest.approx(250 * sum(own) / 3, rel=1e-10)


def test_lpp_first_epochs_replay_the_public_update_order():
    """W and b: SGD with momentum at 4N/lambda_max; alpha: one step at epoch 10 with the sum of its ten gradients
    (never reset); W starts at the class sums of the normalised features, b at nn.Linear's default from the seed."""
    ctx = context(c=3, d=6, shots=4, seed=2)
    fitted = fit_lpp(ctx, LPPConfig(epochs=10, search="none"))
    f = F.normalize(ctx.train_views[0].double(), dim=-1)
    y = ctx.train_labels
    t = F.normalize(ctx.base.double(), dim=-1)
    w = torch.stack([f[y == c].sum(0) for c in range(3)]).requires_grad_(True)
    torch.manual_seed(ctx.seed)
    b = torch.nn.Linear(6, 3).bias.detach().double().requires_grad_(True)
    own = (f @ t.t())[torch.arange(12), y]
    a0 = 250 * torch.stack([own[y == c].mean() for c in range(3)]).mean()
    a = torch.full((3,), float(a0), dtype=torch.float64, requires_grad=True)
    lr_w = 4 * 12 / torch.linalg.svdvals(f)[0].item() ** 2
    lr_a = 12 / (4 * ((f @ t.t()) ** 2).sum(0).max().item())
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for epoch in range(10):
        loss = F.cross_entropy(f @ w.t() + b + a * (f @ t.t()), y)
        gw, gb = torch.autograd.grad(loss, (w, b), retain_graph=True)
        loss.backward(inputs=[a])  # a.grad accumulates over epochs
        with torch.no_grad():
            vw, vb = 0.9 * vw + gw if epoch else gw, 0.9 * vb + gb if epoch else gb
            w -= lr_w * vw
            b -= lr_w * vb
    with torch.no_grad():
        a -= lr_a * a.grad
    head = fitted.head
    torch.testing.assert_close(head.weight.double(), w.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.bias.double(), b.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.alpha.double(), a.detach(), atol=1e-3, rtol=1e-4)
    assert fitted.info["lpp_epoch"] == 9 and fitted.info["lpp_alpha_init"] == pytest.approx(float(a0), rel=1e-6)
    assert fitted.info["lpp_lr_w"] == pytest.approx(lr_w, rel=1e-6)


def test_lpp_head_logits_and_export():
    ctx = context(seed=4)
    head = fit_lpp(ctx, LPPConfig(epochs=20)).head
    x = ctx.val_features
    f, t = F.normalize(x, dim=-1), F.normalize(ctx.base, dim=-1)
    torch.testing.assert_close(head(x), f @ head.weight.t() + head.bias + head.alpha * (f @ t.t()))
    again = LPPHead.from_export(*head.export())
    assert torch.equal(again(x), head(x)) and torch.equal(head.base_text_features, ctx.base)


def test_lpp_keeps_the_last_of_the_best_validation_epochs():
    records = []
    ctx = context(seed=5, on_epoch=records.append)
    fitted = fit_lpp(ctx, LPPConfig(epochs=30))
    accs = [r["val_accuracy"] for r in records]
    best = max(accs)
    assert fitted.info["lpp_epoch"] == max(i for i, a in enumerate(accs) if a == best)
    assert fitted.info["lpp_val_accuracy"] == best
    head = fitted.head
    assert 100.0 * float((head(ctx.val_features).argmax(1) == ctx.val_labels).float().mean()) == pytest.approx(best)


def test_lpp_with_several_views_starts_at_the_per_image_class_sums():
    ctx = context(views=3, seed=6)
    fitted = fit_lpp(ctx, LPPConfig(epochs=1, search="none", momentum=0.0))
    f = F.normalize(ctx.train_views.reshape(-1, 8), dim=-1)
    y = ctx.train_labels.repeat(3)
    w0 = torch.stack([f[y == c].sum(0) for c in range(3)]) / 3
    # one plain step from w0 at the data-derived step size
    w = w0.clone().requires_grad_(True)
    torch.manual_seed(ctx.seed)
    b = torch.nn.Linear(8, 3).bias.detach()
    t = F.normalize(ctx.base, dim=-1)
    a0 = fitted.info["lpp_alpha_init"]
    F.cross_entropy(f @ w.t() + b + a0 * (f @ t.t()), y).backward()
    torch.testing.assert_close(fitted.head.weight, (w0 - fitted.info["lpp_lr_w"] * w.grad), atol=1e-4, rtol=1e-4)


# ---- ZS-LP and CLAP -----------------------------------------------------------------------------------------------


def trained_context(**kw):
    """A base unrelated to the clusters, so that zero-shot is wrong and the probe has something to learn."""
    optim = OptimConfig(lr=0.1, epochs=5, batch_size=8, weight_decay=0.0, optimizer="sgd", momentum=0.9)
    base = torch.randn(3, 8, generator=torch.Generator().manual_seed(11))
    return context(views=3, optim=optim, base=base, **kw)


@pytest.mark.parametrize("fit,config", [(fit_zs_lp, ZSLPConfig()), (fit_clap, CLAPConfig())])
def test_only_the_prototypes_change(fit, config):
    ctx = trained_context(seed=1)
    base = ctx.base.clone()
    fitted = fit(ctx, config)
    head = fitted.head
    assert isinstance(head, ZSLPHead) and torch.equal(head.base_text_features, base)
    assert float(head.logit_scale) == 100.0 and not torch.equal(head.prototypes, base)
    assert [n for n, p in head.named_parameters()] == ["prototypes"]
    torch.testing.assert_close(head(ctx.val_features), cosine_logits(ctx.val_features, head.prototypes, 100.0))


def test_zero_shot_identity_at_initialisation():
    ctx = trained_context()
    for name in ("zs-lp", "clap"):
        head = METHODS[name].init_head(ctx, METHODS[name].default_config())
        assert torch.equal(head(ctx.val_features), cosine_logits(ctx.val_features, ctx.base, 100.0))


def test_clap_penalty_weights_match_an_independent_derivation():
    g = torch.Generator().manual_seed(7)
    feats, base = torch.randn(9, 4, generator=g), torch.randn(3, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    weights = penalty_weights(feats, labels, base, 10.0)
    expected = []
    for c in range(3):
        probs = []
        for i in range(9):
            if labels[i] == c:
                cos = [float(feats[i] @ base[k] / (feats[i].norm() * base[k].norm())) for k in range(3)]
                e = [math.exp(10.0 * v) for v in cos]
                probs.append(e[c] / sum(e))
        expected.append(sum(probs) / len(probs))
    torch.testing.assert_close(weights.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    # known answer: features orthogonal to every prototype give uniform zero-shot probabilities, lambda = 1 / C
    base = torch.eye(4)[:3]
    uniform = penalty_weights(torch.eye(4)[3:].repeat(3, 1), torch.arange(3), base, 100.0)
    torch.testing.assert_close(uniform, torch.full((3,), 1 / 3))
    # the penalty: mean over classes of lambda_c * squared distance
    w = base + torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 3.0]])
    assert float(class_penalty(w, base, torch.tensor([0.5, 1.0, 2.0]))) == pytest.approx((0.5 + 4 + 18) / 3)


def test_clap_training_replays_gradient_descent_on_ce_plus_penalty():
    """One batch holding the whole pool (N < batch size, so one step per epoch, order-free), plain SGD, no warm-up:
    two epochs of w <- w - lr_e * grad(CE + mean_c lambda_c |w_c - t_c|^2), lr_e the cosine of each epoch."""
    optim = OptimConfig(
        lr=0.5, epochs=2, batch_size=64, weight_decay=0.0, optimizer="sgd", momentum=0.0, warmup_epochs=0
    )
    ctx = context(views=3, optim=optim, seed=8)
    fitted = fit_clap(ctx, CLAPConfig())
    x = ctx.train_views.reshape(-1, 8)
    y = ctx.train_labels.repeat(3)
    t = ctx.base
    probs = (100.0 * F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).t()).softmax(-1)
    lam = torch.stack([probs[y == c, c].mean() for c in range(3)])
    assert fitted.info["clap_lambda"] == pytest.approx(lam.tolist(), rel=1e-5)
    w = t.clone()
    for epoch in range(2):
        w.requires_grad_(True)
        loss = (
            F.cross_entropy(100.0 * F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).t(), y)
            + (lam * ((w - t) ** 2).sum(-1)).mean()
        )
        (grad,) = torch.autograd.grad(loss, w)
        lr = 0.5 * (1 + math.cos(math.pi * epoch / 2)) / 2
        w = (w - lr * grad).detach()
    torch.testing.assert_close(fitted.head.prototypes, w, atol=1e-5, rtol=1e-5)
    # ZS-LP is the same without the penalty: it moves further from the zero-shot prototypes
    zs = fit_zs_lp(context(views=3, optim=optim, seed=8), ZSLPConfig()).head
    assert (zs.prototypes - t).norm() > (fitted.head.prototypes - t).norm()


def test_batches_per_epoch_follow_the_loader_over_the_support_images():
    optim = OptimConfig(batch_size=256)
    assert batches_per_epoch(100, optim) == 1  # one batch of 256 drawn from the 20 * 100 pooled features
    assert batches_per_epoch(1600, optim) == 6  # drop_last: 1600 // 256
    assert batches_per_epoch(1600, OptimConfig(batch_size=256, drop_last="never")) == 7


def test_a_strong_penalty_keeps_clap_near_zero_shot():
    """The penalty pulls every prototype back towards t: CLAP moves less than ZS-LP from the same start."""
    optim = OptimConfig(lr=0.1, epochs=20, batch_size=8, weight_decay=0.0, optimizer="sgd", momentum=0.9)
    shifts = {}
    for name, fit, config in (("zs", fit_zs_lp, ZSLPConfig()), ("clap", fit_clap, CLAPConfig())):
        ctx = context(views=2, optim=optim, seed=9)
        head = fit(ctx, config).head
        shifts[name] = float((head.prototypes - ctx.base).norm())
    assert shifts["clap"] < shifts["zs"]


# ---- CLI end to end -----------------------------------------------------------------------------------------------

CLI_ARGS = {
    "lp++": [],
    "zs-lp": ["--epochs", "3", "--views", "2"],
    "clap": ["--epochs", "3", "--views", "2"],
}
TENSORS = {
    "lp++": {"weight", "bias", "alpha", "base_text_features"},
    "zs-lp": {"base_text_features", "prototypes"},
    "clap": {"base_text_features", "prototypes"},
}


@pytest.mark.parametrize("method", list(CLI_ARGS))
def test_train_eval_and_predict_through_the_cli(env, capsys, method):
    from safetensors import safe_open

    tmp, base, image_dir = env
    run_dir = tmp / method.replace("+", "p")
    code, out, err = run(
        ["train", *base, "--shots", "2", "--seed", "1", "--method", method, *CLI_ARGS[method], "--out", str(run_dir)],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method and metrics["n_test"] == 12 and metrics["n_train"] == 6
    with safe_open(str(run_dir / "classifier.safetensors"), "pt") as f:
        assert set(f.keys()) == TENSORS[method]
    if method == "lp++":
        assert config["optim"] is None and config["views"] == 1
        assert {"lpp_lr_w", "lpp_lr_alpha", "lpp_alpha_init", "lpp_epoch"} <= set(metrics)
        assert len((run_dir / "log.jsonl").read_text().splitlines()) == 300
    else:
        assert config["optim"]["optimizer"] == "sgd" and config["optim"]["lr"] == 0.1
        assert config["optim"]["epochs"] == 3 and config["views"] == 2
        assert metrics["pool_size"] == 12
    if method == "clap":
        assert len(metrics["clap_lambda"]) == 3 and all(0 < v <= 1 for v in metrics["clap_lambda"])

    code, _, err = run(["eval", "--run", str(run_dir), "--quiet", "--out", str(tmp / f"ev-{run_dir.name}")], capsys)
    assert code == 0, err
    again = json.loads((tmp / f"ev-{run_dir.name}" / "metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    code, out, err = run(
        ["predict", "--run", str(run_dir), "--json", "--top-k", "2", str(image_dir / "test" / "red_0.png")], capsys
    )
    assert code == 0, err
    assert len(json.loads(out)[0]["top"]) == 2


def test_cli_options_of_the_new_methods(env, capsys):
    tmp, base, _ = env
    code, _, err = run(
        ["train", *base, "--shots", "2", "--seed", "1", "--method", "lp++", "--lr", "0.1", "--out", str(tmp / "bad")],
        capsys,
    )
    assert code == 2 and "lr" in err
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "1",
            "--method",
            "lp++",
            "--search",
            "none",
            "--out",
            str(tmp / "lpp-none"),
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((tmp / "lpp-none" / "metrics.json").read_text())
    assert metrics["lpp_epoch"] == 299 and "lpp_val_accuracy" not in metrics
