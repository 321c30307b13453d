"""`taskres train --method NAME` end to end through main([...]): the same run folder, then eval and predict."""

import json
import os

import pytest
import torch
from conftest import run_cli as run
from safetensors import safe_open

METHOD_ARGS = {
    "taskres": ["--epochs", "3", "--views", "2"],
    "linear-probe": [],
    "clip-adapter": ["--epochs", "3", "--views", "2"],
    "tip-adapter": ["--views", "2"],
    "tip-adapter-f": ["--epochs", "3", "--views", "2"],
    "coop": ["--epochs", "2", "--views", "1", "--coop-n-ctx", "4"],
}
TENSORS = {
    "taskres": {"base_text_features", "text_feature_residuals"},
    "linear-probe": {"weight", "bias"},
    "clip-adapter": {"base_text_features", "adapter.0.weight", "adapter.2.weight"},
    "tip-adapter": {"base_text_features", "cache_keys", "cache_values"},
    "tip-adapter-f": {"base_text_features", "cache_keys", "cache_values"},
    "coop": {"text_features", "ctx"},
}


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_every_method_trains_evaluates_and_predicts(env, capsys, method):
    tmp, base, image_dir = env
    run_dir = tmp / method
    code, out, err = run(
        [
            "train",
            *base,
            "--shots",
            "4",
            "--seed",
            "1",
            "--method",
            method,
            *METHOD_ARGS[method],
            "--out",
            str(run_dir),
        ],
        capsys,
    )
    assert code == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method and metrics["n_test"] == 12 and metrics["n_train"] == 12
    assert metrics["accuracy"] == pytest.approx(100 * metrics["n_correct"] / 12)
    assert metrics["mean_per_class_accuracy"] == pytest.approx(
        sum(p["accuracy"] for p in metrics["per_class_accuracy"]) / 3
    )
    assert json.loads((run_dir / "fewshot_split.json").read_text())["train"]
    with safe_open(str(run_dir / "classifier.safetensors"), "pt") as f:
        assert set(f.keys()) == TENSORS[method]
        meta = f.metadata()
    assert meta["method"] == method and json.loads(meta["config"])
    if method in ("tip-adapter", "linear-probe"):
        assert config["optim"] is None
    else:
        assert config["optim"]["epochs"] == int(METHOD_ARGS[method][1])
    if method in ("clip-adapter", "coop"):
        assert config["optim"]["optimizer"] == "sgd" and config["optim"]["batch_size"] == 32
    if method == "tip-adapter-f":
        assert config["optim"]["optimizer"] == "adamw" and config["method_config"]["preset"] == "generic"
        assert len((run_dir / "log.jsonl").read_text().splitlines()) == 3
    if method == "linear-probe":
        assert config["views"] == 0 and metrics["lp_c"] > 0
    if method.startswith("tip"):
        assert {"tip_alpha", "tip_beta"} <= set(metrics)

    code, _, err = run(["eval", "--run", str(run_dir), "--quiet", "--out", str(tmp / f"ev-{method}")], capsys)
    assert code == 0, err
    again = json.loads((tmp / f"ev-{method}" / "metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])
    img = str(image_dir / "test" / "blue_0.png")
    code, out, err = run(["predict", "--run", str(run_dir), "--json", "--top-k", "3", img], capsys)
    assert code == 0, err
    top = json.loads(out)[0]["top"]
    assert len(top) == 3 and sum(t["prob"] for t in top) == pytest.approx(1.0, abs=1e-5)


def test_methods_command_lists_every_method(capsys):
    code, out, _ = run(["methods"], capsys)
    assert code == 0
    for name in METHOD_ARGS:
        assert any(line.startswith(name + " ") for line in out.splitlines())


def test_enhance_base_saves_a_projection_that_base_weights_reuses(env, capsys):
    tmp, base, _ = env
    args = ["train", *base, "--shots", "2", "--seed", "1", "--epochs", "2", "--views", "1"]
    code, out, err = run([*args, "--enhance-base", "--out", str(tmp / "star")], capsys)
    assert code == 0, err
    saved = tmp / "star" / "text_projection.safetensors"
    assert saved.is_file() and "text_projection_file" in out
    metrics = json.loads((tmp / "star" / "metrics.json").read_text())
    assert metrics["enhanced_base_lr"] in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2) and "enhanced_base_accuracy" in metrics
    assert json.loads((tmp / "star" / "config.json").read_text())["base"]["tune"] is True
    code, _, err = run([*args, "--base-weights", str(saved), "--out", str(tmp / "reuse")], capsys)
    assert code == 0, err
    bases = []
    for name in ("star", "reuse"):
        with safe_open(str(tmp / name / "classifier.safetensors"), "pt") as f:
            bases.append(f.get_tensor("base_text_features"))
    assert torch.equal(bases[0], bases[1])
    assert json.loads((tmp / "reuse" / "metrics.json").read_text())["enhanced_base_accuracy"] == pytest.approx(
        metrics["enhanced_base_accuracy"]
    )


def test_malicious_base_weights_exit_2_naming_the_file(env, capsys):
    tmp, base, _ = env
    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp / "model.pth.tar"
    torch.save({"state_dict": {"weight": torch.zeros(32, 64)}, "scheduler": Payload()}, evil)
    code, _, err = run(
        ["train", *base, "--shots", "2", "--seed", "1", "--base-weights", str(evil), "--out", str(tmp / "r")], capsys
    )
    assert code == 2 and str(evil) in err and "refused" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp / "r" / "metrics.json").exists()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--method", "taskres", "--lp-c", "1"], "--lp-c applies to --method linear-probe; got --method taskres"),
        (["--method", "tip-adapter", "--lr", "0.1"], "--lr: method 'tip-adapter' is training-free"),
        (["--method", "linear-probe", "--views", "3"], "set --views to 0"),
        (["--method", "linear-probe", "--lp-c", "1"], "set --search none with it"),
        (["--method", "tip-adapter", "--tip-alpha", "1"], "set --search none with them"),
        (["--method", "coop", "--base-weights", "x.pt"], "--base-weights applies to --method taskres"),
        (["--enhance-base", "--base-weights", "x.pt"], "not both"),
        (["--base-weights", "nowhere.pt"], "--base-weights file 'nowhere.pt' does not exist"),
        (["--method", "coop"], "needs 20 tokens with 16 context vectors"),
        (["--method", "tip-adaptr"], "did you mean 'tip-adapter'"),
    ],
)
def test_method_option_errors_exit_2(env, capsys, extra, match):
    tmp, base, _ = env
    code, _, err = run(["train", *base, "--shots", "2", "--seed", "1", *extra, "--out", str(tmp / "r")], capsys)
    assert code == 2, err
    assert match in err and "Traceback" not in err
