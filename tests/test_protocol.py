"""The official protocol on demand: CoOp's zero-shot CLIP, TaskRes as the official trainer runs it, Tip-Adapter's
public selection (labelled when it used the test split); Dassl's few-shot pickles and official checkpoints read
safely."""

import copy
import json
import os
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli as run
from safetensors import safe_open

from taskres.backbones import load_backbone
from taskres.backbones.official import fp16_backbone, trainer_backbone
from taskres.cache import FeatureCache
from taskres.config import Setup
from taskres.data.sampling import sample_fewshot
from taskres.data.sources import open_dataset
from taskres.errors import TaskResError
from taskres.methods.taskres import TaskResConfig, TaskResHead
from taskres.reuse import evaluate_run
from taskres.text import zeroshot_clip_classifier
from taskres.workflow import zeroshot


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture()
def underscored(split_dataset, tmp_path):
    """The tiny dataset with a class name holding an underscore ("dark_red")."""
    image_dir, split_file = split_dataset
    splits = json.loads(split_file.read_text())
    for entries in splits.values():
        for e in entries:
            e[2] = "dark_red" if e[2] == "red" else e[2]
    path = tmp_path / "split_underscored.json"
    path.write_text(json.dumps(splits))
    return image_dir, path


def test_official_zero_shot_is_coops_zeroshot_clip(underscored, openai_rn_file, tmp_path):
    image_dir, split_file = underscored
    backbone = load_backbone(str(openai_rn_file))
    data = open_dataset(image_dir, split_file, ["a photo of a {}."])
    setup = Setup(cache_dir=str(tmp_path / "cache"), quiet=True)
    official = zeroshot(backbone, data, setup, out=tmp_path / "zs", protocol="official")
    # Independently: "_" replaced, each prompt normalised, tau * cosine.
    with torch.no_grad():
        text = backbone.model.encode_text(
            backbone.tokenizer(["a photo of a dark red.", "a photo of a green.", "a photo of a blue."])
        )
    t = F.normalize(text.float(), dim=-1)
    # ... all in fp16, as CoOp's ZeroshotCLIP (bit for bit against the clip package: test_official_details.py).
    saved = tensors(tmp_path / "zs" / "classifier.safetensors")["base_text_features"]
    assert torch.equal(saved, zeroshot_clip_classifier(backbone, data.classnames, ["a photo of a {}."]))
    assert torch.allclose(saved, t, atol=2e-3) and not torch.equal(saved, t)  # fp16 values
    half = fp16_backbone(backbone)
    feats, _ = FeatureCache(None).features(half, [data.path(e) for e in data.test])
    labels = torch.tensor([e.label for e in data.test])
    pred = (backbone.logit_scale * F.normalize(feats, dim=-1) @ saved.t()).argmax(1)
    assert official["n_correct"] == int((pred == labels).sum())
    record = json.loads((tmp_path / "zs" / "config.json").read_text())
    assert record["backbone"]["official"] == "fp16"  # eval and predict run the run's model as it ran
    again = evaluate_run(tmp_path / "zs", setup)
    assert again["n_correct"] == official["n_correct"]
    default = zeroshot(backbone, data, setup, out=tmp_path / "zs-default")
    saved = tensors(tmp_path / "zs-default" / "classifier.safetensors")["base_text_features"]
    assert not torch.allclose(F.normalize(saved, dim=-1), t, atol=1e-4)  # the underscore is kept there
    assert json.loads((tmp_path / "zs" / "config.json").read_text())["protocol"] == "official"
    assert default["protocol"] == "default"


def test_zero_shot_is_a_method_that_train_runs_as_zeroshot_does(underscored, openai_rn_file, tmp_path):
    """The registered zero-shot method, trained (nothing is learned), is the `zeroshot` run: the same base under
    either protocol (its official variant: CoOp's ZeroshotCLIP), the same test accuracy."""
    from taskres.config import TrainConfig
    from taskres.workflow import train

    image_dir, split_file = underscored
    backbone = load_backbone(str(openai_rn_file))
    data = open_dataset(image_dir, split_file, ["a photo of a {}.", "a {} thing."])
    setup = Setup(cache_dir=str(tmp_path / "cache"), quiet=True)
    for protocol in ("default", "official"):
        config = TrainConfig.resolve("zero-shot", 2, 1, protocol=protocol)
        assert config.optim is None and config.views == 0
        head, metrics = train(backbone, data, config, setup, out=tmp_path / f"train-{protocol}")
        alone = zeroshot(backbone, data, setup, out=tmp_path / f"zs-{protocol}", protocol=protocol)
        assert metrics["accuracy"] == alone["accuracy"] == metrics["zero_shot_accuracy"]
        trained = tensors(tmp_path / f"train-{protocol}" / "classifier.safetensors")["base_text_features"]
        assert torch.equal(
            trained, tensors(tmp_path / f"zs-{protocol}" / "classifier.safetensors")["base_text_features"]
        )
        record = json.loads((tmp_path / f"train-{protocol}" / "config.json").read_text())
        assert record["method"] == "zero-shot" and record["method_config"] == {} and record["base"] is None
    with pytest.raises(TaskResError, match="method 'zero-shot' is training-free"):
        TrainConfig.resolve("zero-shot", 2, 1, optim={"lr": 1e-3})


def test_imagenet_official_zero_shot_uses_one_template():
    from taskres.data.benchmarks import BENCHMARKS, coop_zeroshot_templates
    from taskres.data.splits import DatasetSplits

    def fake(name, templates):
        return DatasetSplits(name, image_dir=None, train=(), val=(), test=(), classnames=("a",), templates=templates)

    assert len(BENCHMARKS["imagenet"].templates) == 8
    assert coop_zeroshot_templates(fake("imagenet", BENCHMARKS["imagenet"].templates)) == ("a photo of a {}.",)
    assert coop_zeroshot_templates(fake("dtd", BENCHMARKS["dtd"].templates)) == ("{} texture.",)
    assert coop_zeroshot_templates(fake("mine", ("x {}", "y {}"))) == ("x {}", "y {}")


def test_official_taskres_trains_online_on_an_fp16_base(env, capsys, openai_rn_file):
    tmp, base, image_dir = env
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "1",
            "--epochs",
            "2",
            "--protocol",
            "official",
            "--out",
            str(tmp / "off"),
        ],
        capsys,
    )
    assert code == 0, err
    config = json.loads((tmp / "off" / "config.json").read_text())
    metrics = json.loads((tmp / "off" / "metrics.json").read_text())
    assert config["views"] == "online" and config["protocol"] == "official" and metrics["test_selected"] is False
    backbone = load_backbone(str(openai_rn_file))
    half = copy.deepcopy(backbone.model).half()
    with torch.no_grad():
        expected = torch.stack(
            [half.encode_text(backbone.tokenizer([f"a photo of a {c}."])).mean(0) for c in ("red", "green", "blue")]
        ).float()
    saved = tensors(tmp / "off" / "classifier.safetensors")["base_text_features"]
    assert torch.equal(saved, expected)
    full = backbone.model.encode_text(backbone.tokenizer(["a photo of a red."])).float()[0]
    assert not torch.equal(saved[0], full)  # the fp16 base differs from the fp32 one


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--method", "coop"], "--protocol official runs a method as its public code does; method 'coop' has no"),
        (["--views", "5"], "--protocol official trains taskres on --views online"),
    ],
)
def test_official_protocol_errors(env, capsys, extra, match):
    tmp, base, _ = env
    code, _, err = run(
        ["train", *base, "--shots", "2", "--seed", "1", "--protocol", "official", *extra, "--out", str(tmp / "x")],
        capsys,
    )
    assert code == 2 and match in err and "Traceback" not in err


def test_official_tip_adapter_f_selects_on_test_and_says_so(env, capsys):
    tmp, base, _ = env
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "1",
            "--method",
            "tip-adapter-f",
            "--epochs",
            "2",
            "--protocol",
            "official",
            "--out",
            str(tmp / "tipf"),
        ],
        capsys,
    )
    assert code == 0, err
    assert "selected on the test split" in err
    metrics = json.loads((tmp / "tipf" / "metrics.json").read_text())
    config = json.loads((tmp / "tipf" / "config.json").read_text())
    assert metrics["test_selected"] is True and metrics["tip_search_split"] == "full_val"
    assert config["views"] == 10 and config["view_scale"] == [0.5, 1.0]
    log = [json.loads(line) for line in (tmp / "tipf" / "log.jsonl").read_text().splitlines()]
    assert all("test_accuracy" in r for r in log)
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "1",
            "--method",
            "tip-adapter",
            "--protocol",
            "official",
            "--out",
            str(tmp / "tip"),
        ],
        capsys,
    )
    assert code == 0 and "selected on the test split" not in err
    assert json.loads((tmp / "tip" / "metrics.json").read_text())["test_selected"] is False


# ---- Dassl's few-shot pickles ---------------------------------------------------------------------------------


@pytest.fixture()
def dassl_datum():
    """A stand-in for dassl.data.datasets.base_dataset.Datum, importable while the test pickles with it."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    modules = {n: types.ModuleType(n) for n in names}

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = names[-1], "Datum"
    modules[names[-1]].Datum = Datum
    sys.modules.update(modules)
    yield Datum
    for n in names:
        sys.modules.pop(n, None)


def write_dassl_pickle(path, fewshot, Datum, root="/mnt/other-machine/tiny/images"):
    data = {k: [Datum(f"{root}/{e.impath}", e.label, 0, e.classname) for e in v] for k, v in fewshot.items()}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)


def test_dassl_pickle_gives_the_same_images_as_the_draw(env, capsys, dassl_datum, split_dataset):
    tmp, base, _ = env
    image_dir, split_file = split_dataset
    data = open_dataset(image_dir, split_file)
    fewshot = sample_fewshot(data, 2, 1)
    pkl = tmp / "split_fewshot" / "shot_2-seed_1.pkl"
    pkl.parent.mkdir()
    write_dassl_pickle(pkl, fewshot, dassl_datum)
    sys.modules.pop("dassl.data.datasets.base_dataset")  # reading must not need (or import) Dassl
    code, _, err = run(["train", *base, "--fewshot-file", str(pkl), "--epochs", "3", "--out", str(tmp / "f")], capsys)
    assert code == 0, err
    code, _, err = run(
        ["train", *base, "--shots", "2", "--seed", "1", "--epochs", "3", "--out", str(tmp / "d")], capsys
    )
    assert code == 0, err
    split_f = json.loads((tmp / "f" / "fewshot_split.json").read_text())
    assert split_f == json.loads((tmp / "d" / "fewshot_split.json").read_text())
    assert split_f["train"][0] == fewshot["train"][0].to_json()
    a, b = tensors(tmp / "f" / "classifier.safetensors"), tensors(tmp / "d" / "classifier.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp / "f" / "config.json").read_text())
    assert config["shots"] == 2 and config["seed"] == 1 and config["fewshot_file"] == str(pkl)
    # A run's own fewshot_split.json works too, and --shots must agree with the file.
    code, _, err = run(
        [
            "train",
            *base,
            "--fewshot-file",
            str(tmp / "d" / "fewshot_split.json"),
            "--seed",
            "1",
            "--shots",
            "4",
            "--out",
            str(tmp / "g"),
        ],
        capsys,
    )
    assert (
        code == 2 and "--shots must agree with the few-shot file, which holds up to 2 images per class; got 4." in err
    )


def test_dassl_pickle_with_other_labels_or_images_is_refused(env, capsys, dassl_datum, split_dataset):
    tmp, base, _ = env
    data = open_dataset(*split_dataset)
    fewshot = sample_fewshot(data, 2, 1)
    wrong = {"train": [type(e)(e.impath, (e.label + 1) % 3, e.classname) for e in fewshot["train"]], "val": []}
    write_dassl_pickle(tmp / "shot_2-seed_1.pkl", wrong, dassl_datum)
    code, _, err = run(
        ["train", *base, "--fewshot-file", str(tmp / "shot_2-seed_1.pkl"), "--out", str(tmp / "x")], capsys
    )
    assert code == 2 and "has label" in err and fewshot["train"][0].impath in err
    alien = {"train": [type(e)("train/purple_9.png", e.label, e.classname) for e in fewshot["train"]], "val": []}
    write_dassl_pickle(tmp / "shot_2-seed_2.pkl", alien, dassl_datum)
    code, _, err = run(
        ["train", *base, "--fewshot-file", str(tmp / "shot_2-seed_2.pkl"), "--out", str(tmp / "y")], capsys
    )
    assert code == 2 and "purple_9.png' is not a train image" in err


def test_malicious_fewshot_pickle_is_refused_without_running(env, capsys):
    tmp, base, _ = env
    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp / "shot_1-seed_1.pkl", "wb") as f:
        pickle.dump({"train": [Payload()]}, f)
    code, _, err = run(
        ["train", *base, "--fewshot-file", str(tmp / "shot_1-seed_1.pkl"), "--out", str(tmp / "x")], capsys
    )
    assert code == 2 and "is refused" in err and "system" in err and "Traceback" not in err
    assert not marker.exists()


# ---- official checkpoints ----------------------------------------------------------------------------------------


def official_checkpoint(path, base, residual):
    """What the official trainer saves: the residual state, plus Adam's state and the scheduler objects."""
    param = torch.nn.Parameter(residual.clone())
    adam = torch.optim.Adam([param], lr=2e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adam, 10)
    torch.save(
        {
            "state_dict": {"base_text_features": base.half(), "text_feature_residuals": residual.half()},
            "epoch": 200,
            "optimizer": adam.state_dict(),
            "scheduler": {"successor": cosine},
            "val_result": None,
        },
        path,
    )


def test_import_official_checkpoint_gives_a_run_that_eval_and_predict_use(env, capsys, openai_rn_file):
    tmp, base_args, image_dir = env
    backbone = load_backbone(str(openai_rn_file))
    from taskres.text import build_base_classifier

    base = build_base_classifier(backbone, ["red", "green", "blue"], ["a photo of a {}."])
    residual = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    ckpt = tmp / "prompt_learner" / "model.pth.tar-200"
    ckpt.parent.mkdir()
    official_checkpoint(ckpt, base, residual)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)  # what a plain safe load refuses
    code, out, err = run(
        ["import-official", str(ckpt), *base_args, "--alpha", "0.5", "--out", str(tmp / "imp")], capsys
    )
    assert code == 0, err
    metrics = json.loads((tmp / "imp" / "metrics.json").read_text())
    head = TaskResHead(base.half().float(), backbone.logit_scale, TaskResConfig(alpha=0.5))
    with torch.no_grad():
        head.text_feature_residuals.copy_(residual.half().float())
    data = open_dataset(image_dir, base_args[base_args.index("--split-file") + 1])
    paths = [data.path(e) for e in data.test]
    trainer = trainer_backbone(backbone)  # the official trainer's encoding: fp16-rounded pixels for a ResNet
    feats, _ = FeatureCache(tmp / "trainer-cache").features(trainer, paths)
    assert not torch.equal(feats, FeatureCache(None).features(backbone, paths)[0])
    written, trainers = ({q.name for q in (tmp / c).glob("v*/*") if q.is_dir()} for c in ("cache", "trainer-cache"))
    assert written == trainers and len(written) == 1  # import-official's test features: the trainer's, alone
    labels = torch.tensor([e.label for e in data.test])
    assert metrics["n_correct"] == int((head(feats).argmax(1) == labels).sum())
    assert json.loads((tmp / "imp" / "config.json").read_text())["backbone"]["official"] == "trainer"
    assert metrics["checkpoint_epoch"] == 200 and metrics["base_relative_difference"] < 1e-2
    code, _, err = run(["eval", "--run", str(tmp / "imp"), "--quiet", "--out", str(tmp / "imp-eval")], capsys)
    assert code == 0, err
    assert json.loads((tmp / "imp-eval" / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    code, out, err = run(
        ["predict", "--run", str(tmp / "imp"), "--json", str(image_dir / "test" / "red_0.png")], capsys
    )
    assert code == 0 and json.loads(out)[0]["top"]


def test_import_official_refuses_a_checkpoint_of_another_shape(env, capsys):
    tmp, base_args, _ = env
    ckpt = tmp / "model.pth.tar-50"
    official_checkpoint(ckpt, torch.zeros(5, 32), torch.zeros(5, 32))
    code, _, err = run(["import-official", str(ckpt), *base_args, "--out", str(tmp / "imp")], capsys)
    assert code == 2 and "base_text_features is (5, 32)" in err and "needs (3, 32)" in err


# ---- the validation-free protocol ----------------------------------------------------------------------------------


def test_no_val_protocol_draws_no_val_shots_and_uses_fixed_values(env, capsys):
    tmp, base, _ = env
    for name, extra in (("default", []), ("noval", ["--protocol", "no-val"])):
        code, _, err = run(
            ["train", *base, "--shots", "2", "--seed", "1", "--epochs", "2", *extra, "--out", str(tmp / name)], capsys
        )
        assert code == 0, err
    default = json.loads((tmp / "default" / "fewshot_split.json").read_text())
    noval = json.loads((tmp / "noval" / "fewshot_split.json").read_text())
    assert noval["val"] == [] and default["val"] and noval["train"] == default["train"]
    metrics = json.loads((tmp / "noval" / "metrics.json").read_text())
    assert metrics["protocol"] == "no-val" and "val_accuracy" not in metrics
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "1",
            "--method",
            "tip-adapter-f",
            "--epochs",
            "3",
            "--protocol",
            "no-val",
            "--out",
            str(tmp / "tipf"),
        ],
        capsys,
    )
    assert code == 0, err
    tipf = json.loads((tmp / "tipf" / "metrics.json").read_text())
    config = json.loads((tmp / "tipf" / "config.json").read_text())
    assert config["method_config"]["search"] == "none" and tipf["tip_f_epoch"] == 2  # the last epoch
    assert (tipf["tip_alpha"], tipf["tip_beta"]) == (
        config["method_config"]["init_alpha"],
        config["method_config"]["init_beta"],
    )


def test_no_val_defaults_and_refusals_come_from_each_methods_registry_entry(tmp_path):
    """Under no-val a method that searches on val takes its fixed values (``Method.no_val_options``): TaskRes only
    with its enhanced base; a config set to search on val is refused, naming the method's option
    (``Method.val_option``). The enhanced base is config.json's "base" (``Method.base_record``), and a missing
    --base-weights file is refused before any encoding (``Method.check_files``)."""
    from taskres.config import TrainConfig

    def resolve(method, **options):
        return TrainConfig.resolve(method, 2, 1, options=options, protocol="no-val")

    assert resolve("taskres").method_config.search is None and resolve("taskres").record()["base"] is None
    star = resolve("taskres", enhance_base=True)
    assert star.method_config.search == "none" and star.record()["base"]["search"] == "none"
    assert resolve("linear-probe", c=1.0).method_config.search == "none"
    assert resolve("tip-adapter").method_config.search == "none"
    with pytest.raises(TaskResError, match="no-val selects nothing.*set `search` none") as err:
        resolve("taskres", enhance_base=True, search="val")
    assert err.value.param == "search"
    missing = TrainConfig.resolve("taskres", 2, 1, options={"base_weights": str(tmp_path / "none.safetensors")})
    with pytest.raises(TaskResError, match="does not exist"):
        missing.check_files()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--method", "linear-probe"], "--search none needs a fixed C for the linear probe: set --lp-c"),
        (["--method", "tip-adapter", "--search", "val"], "--protocol no-val selects nothing on a validation split"),
    ],
)
def test_no_val_protocol_errors(env, capsys, extra, match):
    tmp, base, _ = env
    code, _, err = run(
        ["train", *base, "--shots", "2", "--seed", "1", "--protocol", "no-val", *extra, "--out", str(tmp / "x")], capsys
    )
    assert code == 2 and match in err and "Traceback" not in err
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "1",
            "--protocol",
            "no-val",
            "--method",
            "linear-probe",
            "--lp-c",
            "1",
            "--out",
            str(tmp / "lp"),
        ],
        capsys,
    )
    assert code == 0, err
