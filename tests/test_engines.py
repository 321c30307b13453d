"""``--engine`` (taskres.backbones.engines): each engine's features against eager's, their cache entries kept apart
(eager's key as it always was), the ONNX export kept and checked, a run's engine recorded and reloaded, and the
refusals (onnxruntime missing, or asked for fp16)."""

import json
import logging
import sys

import pytest
import torch
from conftest import run_cli

from taskres.app import options
from taskres.backbones import ENGINES, BackboneIdentity, engines, load_backbone
from taskres.backbones.official import fp16_backbone, trainer_backbone
from taskres.cache import FeatureCache
from taskres.config import Setup
from taskres.errors import TaskResValueError
from taskres.reuse import load_run_backbone

TOLERANCE = 1e-4  # the bar: features within 1e-4 relative of eager's


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-image relative difference ``|a - b| / |b|``."""
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    """One weights folder for the module, so that each tiny tower is exported to ONNX once."""
    return tmp_path_factory.mktemp("onnx-weights")


@pytest.mark.parametrize(
    "tower,engine",
    [
        ("openai_rn_file", "channels-last"),
        ("openai_rn_file", "onnxruntime"),
        ("openai_vit_jit_file", "channels-last"),
        ("openai_vit_jit_file", "onnxruntime"),
    ],
)
def test_each_engine_gives_eagers_features_keyed_apart(tower, engine, onnx_dir, request):
    path = str(request.getfixturevalue(tower))
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    eager = load_backbone(path, weights_dir=onnx_dir)
    other = load_backbone(path, weights_dir=onnx_dir, engine=engine)
    reference = eager.encode_images(pixels)  # (5, D)
    features = other.encode_images(pixels)
    assert features.shape == reference.shape and features.dtype == torch.float32
    assert relative(features, reference) <= TOLERANCE
    assert eager.identity.engine is None and other.identity.engine == engine
    assert other.identity.weights_key() == {**eager.identity.weights_key(), "engine": engine}
    assert torch.equal(other.encode_text(["a photo"]), eager.encode_text(["a photo"]))  # text: PyTorch's


def test_eagers_cache_key_is_unchanged():
    """The eager identity's key is the one every cache entry and run record before --engine was written with."""
    identity = BackboneIdentity(spec="RN50", kind="openai", arch="RN50", sha256="ab" * 32, quick_gelu=True)
    assert identity.weights_key() == {
        "arch": "RN50",
        "sha256": "ab" * 32,
        "precision": "fp32",
        "quick_gelu": True,
        "image_size": 224,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    }
    assert BackboneIdentity.from_json(identity.to_json()) == identity


def test_cache_entries_of_two_engines_are_apart(tmp_path, openai_rn_file, image_folder):
    paths = sorted(str(p) for p in (image_folder / "test").rglob("*.jpg"))
    cache = FeatureCache(tmp_path / "cache", quiet=True)
    eager = load_backbone(str(openai_rn_file))
    channels_last = load_backbone(str(openai_rn_file), engine="channels-last")
    assert cache.namespace(eager, None) != cache.namespace(channels_last, None)
    first, _ = cache.features(eager, paths)
    assert cache.encoded == len(paths)
    second, _ = cache.features(channels_last, paths)
    assert cache.encoded == 2 * len(paths)  # a miss: encoded again by its own engine
    assert relative(second, first) <= TOLERANCE
    cache.features(channels_last, paths)
    assert cache.encoded == 2 * len(paths)  # now a hit


def test_the_onnx_export_is_kept_reused_and_replaced_when_damaged(openai_rn_file, onnx_dir, monkeypatch):
    reference = load_backbone(str(openai_rn_file), weights_dir=onnx_dir, engine="onnxruntime")
    kept = engines.onnx_path(load_backbone(str(openai_rn_file)), onnx_dir)
    assert kept.is_file()
    exports = []
    real_export = engines._export
    monkeypatch.setattr(engines, "_export", lambda backbone: exports.append(1) or real_export(backbone))
    pixels = torch.randn(2, 3, 32, 32)
    again = load_backbone(str(openai_rn_file), weights_dir=onnx_dir, engine="onnxruntime")
    assert exports == [] and torch.equal(again.encode_images(pixels), reference.encode_images(pixels))
    kept.write_bytes(b"not an onnx file")
    repaired = load_backbone(str(openai_rn_file), weights_dir=onnx_dir, engine="onnxruntime")
    assert exports == [1] and kept.read_bytes() != b"not an onnx file"
    assert torch.equal(repaired.encode_images(pixels), reference.encode_images(pixels))


def test_onnxruntime_refuses_fp16_and_names_the_extra_when_missing(openai_rn_file, monkeypatch):
    with pytest.raises(TaskResValueError, match="runs the image encoder in fp32; got `precision` fp16"):
        load_backbone(str(openai_rn_file), precision="fp16", engine="onnxruntime")
    with pytest.raises(TaskResValueError, match="on the CPU; the device is cuda:0. Use `engine` eager"):
        engines.check_engine("onnxruntime", torch.device("cuda:0"), "fp32")  # before any GPU is touched
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(TaskResValueError, match=r"needs the optional package\(s\) onnxruntime.*taskres\[export\]"):
        load_backbone(str(openai_rn_file), engine="onnxruntime")


def test_missing_onnxruntime_exits_2_before_anything_is_written(env, capsys, monkeypatch):
    tmp, base, _ = env
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = run_cli(["zeroshot", *base, "--engine", "onnxruntime", "--out", str(tmp / "zs")], capsys)
    assert code == 2 and "pip install 'taskres[export]'" in err and "--engine" in err and "Traceback" not in err
    assert not (tmp / "zs").exists()


def test_official_modes_keep_the_engine_only_where_it_runs_the_same_model(openai_rn_file):
    eager = load_backbone(str(openai_rn_file))
    channels_last = load_backbone(str(openai_rn_file), engine="channels-last")
    trainer = trainer_backbone(channels_last)  # a ResNet: the same model, fp16-rounded pixels
    assert trainer.identity.official == "trainer" and trainer.identity.engine == "channels-last"
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert relative(trainer.encode_images(pixels), trainer_backbone(eager).encode_images(pixels)) <= TOLERANCE
    fp16 = fp16_backbone(channels_last)  # a converted copy, run by PyTorch
    assert fp16.identity.engine is None and fp16.image_engine is None
    assert fp16.identity.weights_key() == fp16_backbone(eager).identity.weights_key()
    assert all(p.is_contiguous() for p in fp16.model.visual.parameters())
    assert torch.equal(fp16.encode_images(pixels), fp16_backbone(eager).encode_images(pixels))


def test_a_channels_last_run_records_its_engine_and_eval_reloads_it(env, capsys, monkeypatch, caplog):
    tmp, base, _ = env
    train = ["train", *base, "--shots", "2", "--seed", "1", "--epochs", "3", "--views", "1"]
    assert run_cli([*train, "--engine", "channels-last", "--out", str(tmp / "cl")], capsys)[0] == 0
    assert run_cli([*train, "--out", str(tmp / "eager")], capsys)[0] == 0
    config = json.loads((tmp / "cl" / "config.json").read_text())
    assert config["backbone"]["engine"] == "channels-last"
    assert "engine" not in json.loads((tmp / "eager" / "config.json").read_text())["backbone"]
    assert load_run_backbone(config, Setup()).identity.engine == "channels-last"
    assert load_run_backbone(config, Setup(engine="eager")).identity.engine is None  # --engine overrides
    # a recorded engine that cannot run here (onnxruntime without its packages): eager, with a warning, not a failure
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    elsewhere = {**config, "backbone": {**config["backbone"], "engine": "onnxruntime"}}
    with caplog.at_level(logging.WARNING, logger="taskres.reuse"):
        assert load_run_backbone(elsewhere, Setup()).identity.engine is None
    assert "engine onnxruntime, which cannot run here" in caplog.text
    accuracy = json.loads((tmp / "cl" / "metrics.json").read_text())["accuracy"]
    cache = base[base.index("--cache-dir") + 1]
    code, out, _ = run_cli(
        ["eval", "--run", str(tmp / "cl"), "--cache-dir", cache, "--quiet", "--out", str(tmp / "e")], capsys
    )
    assert code == 0 and json.loads((tmp / "e" / "metrics.json").read_text())["accuracy"] == accuracy


def test_the_command_line_knows_the_librarys_engines():
    from taskres.app.cli import build_parser

    assert options.ENGINES == ENGINES
    for argv in (["sweep", "EXP"], ["train", "--backbone", "b", "--out", "o"], ["eval", "--run", "r"]):
        assert build_parser().parse_args(argv).engine is None  # eager, or a reloaded run's
        assert build_parser().parse_args([*argv, "--engine", "onnxruntime"]).engine == "onnxruntime"
    assert Setup(engine="channels-last").engine == "channels-last"
    with pytest.raises(TaskResValueError, match="engine must be one of eager, channels-last, onnxruntime"):
        Setup(engine="tensorrt")
