"""CLIP-LoRA (taskres.lora, taskres.lora_training, taskres.methods.clip_lora): identity at initialisation, only the
adapters train, merged equals unmerged, the contract of the methods that train through the encoders (on a tiny ViT
and on the demo's ResNet), the CLI run with eval, predict and export, and the bad inputs."""

import copy
import dataclasses
import json
import re

import pytest
import torch
from conftest import TINY_VIT, make_split_dataset, tiny_clip
from conftest import run_cli as run

from taskres.backbones import load_backbone
from taskres.backbones.engines import with_engine
from taskres.config import Setup, TrainConfig
from taskres.data.sources import open_dataset
from taskres.errors import TaskResValueError
from taskres.features import encode_features
from taskres.lora import check_layers, lora_tensors
from taskres.lora_training import train_through_encoder
from taskres.methods import METHODS, FitContext, cosine_logits
from taskres.methods.clip_lora import ClipLoRAConfig, _training, adapted_backbone, prompts

ENCODER_METHODS = sorted(m for m in METHODS if METHODS[m].adapt_backbone is not None)
QUICK = dict(iterations=4)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny-vit.pt"
    torch.save({k: v.half() for k, v in tiny_clip(TINY_VIT, seed=2).state_dict().items()}, path)
    return load_backbone(str(path))


@pytest.fixture(scope="module")
def demo():
    return load_backbone("taskres-demo")


@pytest.fixture(params=["vit", "demo"])
def backbone(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    image_dir, split_file = make_split_dataset(tmp_path_factory.mktemp("lora") / "tiny")
    return open_dataset(data=str(image_dir), split_file=str(split_file))


def context(backbone, dataset, seed=1, shots=2):
    config = TrainConfig.preset("clip-lora", shots, seed)
    setup = Setup(cache_dir=None, quiet=True)
    fewshot = {"train": dataset.train[: 3 * shots], "val": dataset.val[:3]}
    features = encode_features(backbone, dataset, fewshot, "online", setup, seed=seed)
    return FitContext(
        base=torch.zeros(3, backbone.embed_dim),
        logit_scale=backbone.logit_scale,
        features=features,
        optim=dataclasses.replace(config.optim, batch_size=4, lr=1e-2),
        seed=seed,
        classnames=dataset.classnames,
        shots=shots,
        backbone=backbone,
        quiet=True,
    )


def pixels(backbone, n=3):
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))


def test_lora_at_initialisation_gives_exactly_the_zero_shot_logits(backbone, dataset):
    ctx = context(backbone, dataset)
    config = ClipLoRAConfig()
    training, adapters = _training(ctx, config)
    merged = adapted_backbone(backbone, lora_tensors(adapters), config.scaling, "test")
    x = pixels(backbone)
    zero_shot = cosine_logits(backbone.encode_images(x), backbone.encode_text(prompts(dataset.classnames)), 100.0)
    adapted = cosine_logits(merged.encode_images(x), merged.encode_text(prompts(dataset.classnames)), 100.0)
    assert torch.equal(adapted, zero_shot)
    # the unmerged form (what training runs), with its dropout off, computes the same to rounding
    training.model.eval()
    with torch.no_grad():
        image, text = training.model.encode_image(x), training.text()
    assert torch.allclose(cosine_logits(image, text, 100.0), zero_shot, atol=1e-4)


def test_only_the_adapters_train_and_the_merged_model_equals_the_unmerged(backbone, dataset):
    ctx = context(backbone, dataset)
    config = ClipLoRAConfig(projections="qkvo")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    training, adapters = _training(ctx, config)
    frozen = {k: v.clone() for k, v in training.model.state_dict().items() if ".updates." not in k}
    initial = {k: v.clone() for k, v in lora_tensors(adapters).items()}
    train_through_encoder(training, ctx.train_views, ctx.train_labels, ctx.optim, 3, ctx.seed, quiet=True)
    assert all(torch.equal(v, frozen[k]) for k, v in training.model.state_dict().items() if k in frozen)
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.state_dict().items())
    trained = lora_tensors(adapters)
    assert all(not torch.equal(trained[k], initial[k]) for k in trained if k.endswith(".B"))
    merged = adapted_backbone(backbone, trained, config.scaling, "test")
    x = pixels(backbone)
    training.model.eval()
    with torch.no_grad():
        unmerged = training.model.encode_image(x), training.text()
    merged_out = merged.encode_images(x), merged.encode_text(prompts(dataset.classnames))
    for a, b in zip(unmerged, merged_out):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
    # an --engine runs the plain weights: the adapted encoder of a channels-last backbone is the merged model's
    engined = with_engine(dataclasses.replace(backbone, model=copy.deepcopy(backbone.model)), "channels-last", None)
    on_engine = adapted_backbone(engined, trained, config.scaling, "test")
    assert on_engine.image_engine is None and on_engine.identity.engine is None
    assert torch.allclose(on_engine.encode_images(x), merged_out[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(engined.encode_images(x), merged_out[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ENCODER_METHODS)
def test_encoder_method_contract(method, backbone, dataset):
    """Every method that trains through the encoders: its fit leaves the shared backbone as it was, gives a head
    whose export round trip and class selection hold, and an adapted encoder that differs from the backbone."""
    ctx = context(backbone, dataset)
    spec = METHODS[method]
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    fitted = spec.fit(ctx, spec.configure(spec.default_config(), **QUICK))
    assert all(torch.equal(v, before[k]) for k, v in backbone.model.state_dict().items())
    x = fitted.backbone.encode_images(pixels(backbone))
    head = fitted.head
    again = spec.head_cls.from_export(*head.export())
    assert torch.equal(again(x), head(x)) and torch.isfinite(head(x)).all()
    assert torch.equal(head.select_classes([2, 0])(x), head(x)[:, [2, 0]])
    assert fitted.backbone.identity.adapter and fitted.backbone.identity.sha256 == backbone.identity.sha256
    assert not torch.equal(x, backbone.encode_images(pixels(backbone)))
    assert [a.filename for a in fitted.artifacts] == list(spec.files)


def test_cli_run_eval_predict_and_export(env, capsys):
    tmp, base, image_dir = env
    out = tmp / "lora"
    args = ["--method", "clip-lora", "--lora-iterations", "4", "--batch-size", "4", "--out", str(out)]
    code, _, err = run(["train", *base, "--shots", "2", "--seed", "1", *args], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["views"] == "online" and config["optim"]["optimizer"] == "adamw"
    assert metrics["lora_iterations"] == 4 and metrics["train_encoder_passes"] == 16
    assert (out / "lora.safetensors").exists() and len(
        (out / "log.jsonl").read_text().splitlines()
    ) == 4  # 6 images, 1 batch of 4 a pass
    code, _, err = run(["eval", "--run", str(out), "--quiet", "--out", str(tmp / "ev")], capsys)
    assert code == 0, err
    assert json.loads((tmp / "ev" / "metrics.json").read_text())["accuracy"] == pytest.approx(metrics["accuracy"])
    code, stdout, err = run(["predict", "--run", str(out), "--json", str(image_dir / "test" / "red_0.png")], capsys)
    assert code == 0, err and len(json.loads(stdout)[0]["top"]) == 3
    code, _, err = run(["export", "--run", str(out), "--format", "torchscript", "--out", str(tmp / "m.pt")], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--lora-rank", "0"], "--lora-rank.*>= 1"),
        (["--lora-iterations", "0"], "--lora-iterations.*>= 1"),
        (["--lora-rank", "70"], "--lora-rank 70 is larger than the q projection of layer text.0"),
        (["--lora-projections", "qx"], "--lora-projections"),
        (["--epochs", "3"], "--epochs: method 'clip-lora' does not use it .*counts iterations.*--lora-iterations"),
        (["--views", "3"], "set --views online .*; got 3"),
        (["--lr", "1e38", "--lora-iterations", "4", "--batch-size", "1"], r"diverged by iteration \d of 4: .*adapters"),
    ],
)
def test_bad_lora_options_exit_2_and_write_nothing(env, capsys, extra, match):
    tmp, base, _ = env
    out = tmp / "bad"
    code, _, err = run(
        ["train", *base, "--shots", "1", "--seed", "1", "--method", "clip-lora", *extra, "--out", str(out)], capsys
    )
    assert code == 2 and "Traceback" not in err
    assert re.search(match, err), err
    assert not out.exists()


def test_a_tower_without_attention_is_named_with_what_it_holds(demo):
    model = tiny_clip(TINY_VIT)
    model.visual.transformer.resblocks = torch.nn.ModuleList()
    with pytest.raises(TaskResValueError, match="vision encoder of backbone 'tiny'.*no attention layer.*found"):
        check_layers(model, ("vision",), "tiny")
    assert set(check_layers(demo.model, ("vision",), "taskres-demo")) == {"vision.attnpool"}


def test_out_of_memory_names_the_options_that_reduce_memory(demo, dataset, monkeypatch):
    ctx = context(demo, dataset)
    training, _ = _training(ctx, ClipLoRAConfig())

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(training, "loss", no_memory)
    with pytest.raises(TaskResValueError, match="out of memory.*`batch_size`.*`checkpointing` true"):
        train_through_encoder(training, ctx.train_views, ctx.train_labels, ctx.optim, 2, 1, quiet=True)


def test_sweep_runs_clip_lora_beside_zero_shot_and_the_report_shows_it(env, capsys):
    tmp, base, _ = env
    exp = tmp / "exp"
    grid = ["--methods", "clip-lora,taskres", "--shots", "1", "--seeds", "1", "--lora-iterations", "2"]
    # --epochs and --views go to the methods that use them (taskres), as a method option goes to the ones it names
    code, out, err = run(
        ["sweep", str(exp), *base, *grid, "--batch-size", "4", "--views", "2", "--epochs", "2"], capsys
    )
    assert code == 0, err + out
    configs = {p.parent.parent.name: json.loads(p.read_text()) for p in (exp / "runs").rglob("1shot-seed1/config.json")}
    assert configs["clip-lora"]["views"] == "online" and configs["clip-lora"]["optim"]["epochs"] == 1
    assert configs["taskres"]["views"] == 2 and configs["taskres"]["optim"]["epochs"] == 2
    assert run(["report", str(exp)], capsys)[0] == 0
    table = (exp / "report" / "results.md").read_text()
    assert "clip-lora" in table and "zero-shot" in table


def test_paper_fewshot_takes_clip_lora_only_behind_its_flag(tmp_path, capsys):
    from taskres.app.presets import preset

    assert "clip-lora" not in preset("paper-fewshot", str(tmp_path), ()).methods
    assert preset("paper-fewshot", str(tmp_path), (), with_clip_lora=True).methods[-1] == "clip-lora"
    code, _, err = run(["sweep", str(tmp_path / "exp"), "--with-clip-lora", "--dataset", "dtd"], capsys)
    assert code == 2 and "--with-clip-lora adds clip-lora to --preset paper-fewshot" in err


def test_ctrl_c_mid_training_writes_nothing_and_closes_the_decoding_pool(env, capsys, monkeypatch):
    from taskres import lora_training

    tmp, base, _ = env
    closed = []
    real_close = lora_training.OnlineViews.close
    monkeypatch.setattr(lora_training.OnlineViews, "close", lambda self: (closed.append(1), real_close(self)))

    def interrupted(self, pixels, targets):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_training.EncoderTraining, "loss", interrupted)
    args = ["--method", "clip-lora", "--lora-iterations", "4", "--out", str(tmp / "cut")]
    code, _, err = run(["train", *base, "--shots", "2", "--seed", "1", *args], capsys)
    assert code == 130 and not (tmp / "cut").exists() and closed


def test_gradient_checkpointing_trains_the_same_adapters(vit, dataset):
    trained = []
    for checkpointing in (False, True):
        ctx = context(vit, dataset)
        training, adapters = _training(ctx, ClipLoRAConfig(checkpointing=checkpointing, dropout=0.0))
        train_through_encoder(training, ctx.train_views, ctx.train_labels, ctx.optim, 2, ctx.seed, quiet=True)
        trained.append(lora_tensors(adapters))
    assert all(torch.allclose(trained[0][k], trained[1][k], atol=1e-6) for k in trained[0])
