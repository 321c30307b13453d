"""The CLI end to end through main([...]) on a tiny OpenAI-format checkpoint and generated images."""

import json

import pytest
import torch
from conftest import run_cli as run
from safetensors import safe_open


def test_zeroshot_train_eval_predict(env, capsys):
    tmp, base, image_dir = env
    code, out, _ = run(["zeroshot", *base, "--out", str(tmp / "zs")], capsys)
    assert code == 0
    zs = json.loads((tmp / "zs" / "metrics.json").read_text())
    assert zs["n_test"] == 12 and zs["accuracy"] == pytest.approx(100 * zs["n_correct"] / 12)

    code, out, _ = run(
        ["train", *base, "--shots", "4", "--seed", "1", "--epochs", "15", "--views", "2", "--out", str(tmp / "run")],
        capsys,
    )
    assert code == 0
    run_dir = tmp / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["zero_shot_accuracy"] == pytest.approx(zs["accuracy"])
    assert metrics["n_test"] == 12 and metrics["n_train"] == 12
    per_class = metrics["per_class_accuracy"]
    assert [(p["label"], p["class"], p["n"]) for p in per_class] == [(0, "red", 4), (1, "green", 4), (2, "blue", 4)]
    assert metrics["mean_per_class_accuracy"] == pytest.approx(sum(p["accuracy"] for p in per_class) / 3)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["shots"] == 4 and config["seed"] == 1 and config["optim"]["epochs"] == 15
    assert config["backbone"]["sha256"] and config["taskres_version"]
    split = json.loads((run_dir / "fewshot_split.json").read_text())
    assert len(split["train"]) == 12 and len(split["val"]) == 9
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 15
    with safe_open(str(run_dir / "classifier.safetensors"), "pt") as f:
        assert set(f.keys()) == {"base_text_features", "text_feature_residuals"}
        assert f.get_tensor("text_feature_residuals").shape == (3, 32)
        meta = f.metadata()
    assert json.loads(meta["classnames"]) == ["red", "green", "blue"] and float(meta["alpha"]) == 0.5

    code, out, _ = run(["eval", "--run", str(run_dir), "--quiet", "--out", str(tmp / "ev")], capsys)
    assert code == 0
    assert json.loads((tmp / "ev" / "metrics.json").read_text())["accuracy"] == pytest.approx(metrics["accuracy"])

    img = str(image_dir / "test" / "red_0.png")
    code, out, _ = run(["predict", "--run", str(run_dir), "--json", "--top-k", "2", img, img], capsys)
    assert code == 0
    preds = json.loads(out)
    assert len(preds) == 2 and preds[0]["image"] == img and len(preds[0]["top"]) == 2
    assert preds[0]["top"][0]["prob"] >= preds[0]["top"][1]["prob"]


def test_zero_shot_runs_hold_the_zero_shot_method_and_older_ones_still_load(env, capsys):
    """A zero-shot run's classifier is the zero-shot method's: the base t and the logit scale. One written by an
    older taskres, as a TaskRes head with a zero residual, evaluates and predicts exactly as the new one."""
    from taskres.methods.taskres import TaskResHead
    from taskres.runs import read_classifier, save_classifier

    tmp, base, image_dir = env
    assert run(["zeroshot", *base, "--out", str(tmp / "zs")], capsys)[0] == 0
    method, tensors, meta, classnames, class_ids = read_classifier(tmp / "zs" / "classifier.safetensors")
    assert method == "zero-shot" and set(tensors) == {"base_text_features"} and set(meta) == {"logit_scale"}
    assert json.loads((tmp / "zs" / "config.json").read_text())["method"] == "zero-shot"

    old = tmp / "zs-old"
    old.mkdir()
    for name in ("config.json", "metrics.json"):
        (old / name).write_bytes((tmp / "zs" / name).read_bytes())
    head = TaskResHead(tensors["base_text_features"], meta["logit_scale"])
    save_classifier(old / "classifier.safetensors", "taskres", head, classnames, class_ids)
    assert read_classifier(old / "classifier.safetensors")[0] == "taskres"

    img = str(image_dir / "test" / "red_0.png")
    results = []
    for name in ("zs", "zs-old"):
        assert run(["eval", "--run", str(tmp / name), "--quiet", "--out", str(tmp / f"{name}-ev")], capsys)[0] == 0
        code, out, _ = run(["predict", "--run", str(tmp / name), "--json", "--top-k", "3", img], capsys)
        assert code == 0
        metrics = json.loads((tmp / f"{name}-ev" / "metrics.json").read_text())
        results.append(({k: v for k, v in metrics.items() if k != "run"}, json.loads(out)))
    assert results[0] == results[1]


def test_views_zero_full_batch_is_deterministic(env, capsys):
    tmp, base, _ = env
    outs = []
    for name in ("a", "b"):
        assert (
            run(
                [
                    "train",
                    *base,
                    "--shots",
                    "2",
                    "--seed",
                    "3",
                    "--epochs",
                    "10",
                    "--views",
                    "0",
                    "--lr",
                    "1e-2",
                    "--out",
                    str(tmp / name),
                ],
                capsys,
            )[0]
            == 0
        )
        with safe_open(str(tmp / name / "classifier.safetensors"), "pt") as f:
            outs.append(f.get_tensor("text_feature_residuals"))
    assert outs[0].abs().max() > 0 and torch.equal(outs[0], outs[1])


def test_image_folder_and_variants(tmp_path, image_folder, openai_rn_file, capsys):
    base = [
        "--data",
        str(image_folder),
        "--backbone",
        str(openai_rn_file),
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
        "--device",
        "cpu",
    ]
    code, _, err = run(
        [
            "train",
            *base,
            "--shots",
            "2",
            "--seed",
            "0",
            "--epochs",
            "3",
            "--views",
            "1",
            "--variant",
            "both",
            "--learn-alpha",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert code == 0, err
    with safe_open(str(tmp_path / "r" / "classifier.safetensors"), "pt") as f:
        assert f.get_tensor("image_feature_residual").shape == (1, 32)


def test_finished_run_is_not_overwritten(env, capsys):
    tmp, base, _ = env
    args = ["zeroshot", *base, "--out", str(tmp / "zs")]
    assert run(args, capsys)[0] == 0
    code, _, err = run(args, capsys)
    assert code == 2 and "already holds a finished run" in err and "--overwrite" in err
    assert run([*args, "--overwrite"], capsys)[0] == 0


def replace_arg(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_data", "data folder .* does not exist"),
        ("missing_split", "split file .* does not exist"),
        ("missing_image", "image .*test/red_1.png' does not exist"),
        ("bad_image", "image .*test/red_1.png' cannot be decoded.*--skip-bad-images"),
        ("unknown_backbone", "unknown backbone 'RN5'; did you mean 'RN50'"),
        ("not_checkpoint", "is not a checkpoint that can be read safely"),
        ("zero_shots", "--shots must be an integer >= 1"),
        ("empty_class", r"class\(es\) \['blue'\] have no training images"),
        ("bad_template", "template 'a photo' must contain exactly one"),
    ],
)
def test_bad_input_exits_2_without_traceback(env, capsys, case, match):
    tmp, base, image_dir = env
    args = ["train", *base, "--shots", "2", "--seed", "1", "--epochs", "2", "--views", "0", "--out", str(tmp / "r")]
    if case == "missing_data":
        args = replace_arg(args, "--data", str(tmp / "nowhere"))
    elif case == "missing_split":
        args = replace_arg(args, "--split-file", str(tmp / "nowhere.json"))
    elif case == "missing_image":
        (image_dir / "test" / "red_1.png").unlink()
    elif case == "bad_image":
        (image_dir / "test" / "red_1.png").write_bytes(b"\x89PNG broken")
    elif case == "unknown_backbone":
        args = replace_arg(args, "--backbone", "RN5")
    elif case == "not_checkpoint":
        (tmp / "x.pt").write_text("hello")
        args = replace_arg(args, "--backbone", str(tmp / "x.pt"))
    elif case == "zero_shots":
        args = replace_arg(args, "--shots", "0")
    elif case == "empty_class":
        split_file = args[args.index("--split-file") + 1]
        splits = json.loads(open(split_file).read())
        splits["train"] = [e for e in splits["train"] if e[2] != "blue"]
        open(split_file, "w").write(json.dumps(splits))
    elif case == "bad_template":
        args += ["--template", "a photo"]
    code, out, err = run(args, capsys)
    assert code == 2
    assert "Traceback" not in err and err.startswith("taskres: error: ")
    import re

    assert re.search(match, err), err
    assert not (tmp / "r" / "metrics.json").exists()


def test_skip_bad_images_is_counted(env, capsys):
    tmp, base, image_dir = env
    (image_dir / "test" / "green_2.png").write_bytes(b"broken")
    code, _, err = run(["zeroshot", *base, "--skip-bad-images", "--out", str(tmp / "zs")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp / "zs" / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and metrics["n_test"] == 11


def test_eval_and_predict_refuse_incomplete_runs(env, capsys):
    tmp, _, _ = env
    (tmp / "half").mkdir()
    (tmp / "half" / "config.json").write_text("{}")
    code, _, err = run(["predict", "--run", str(tmp / "half"), "x.png"], capsys)
    assert code == 2 and "incomplete (no metrics.json)" in err


@pytest.mark.parametrize(
    "flag,value,match",
    [
        ("--encode-batch-size", "0", "--encode-batch-size must be >= 1"),
        ("--workers", "-1", "--workers must be >= 0"),
        ("--device", "foo", "is not a torch device"),
        ("--template", "a {} of {x}", "has braces other than"),
    ],
)
def test_bad_option_values_exit_2(env, capsys, flag, value, match):
    tmp, base, _ = env
    args = ["zeroshot", *base, "--out", str(tmp / "zs")]
    args = replace_arg(args, flag, value) if flag in args else [*args, flag, value]
    code, _, err = run(args, capsys)
    assert code == 2 and match in err and "Traceback" not in err


def test_eval_refuses_to_write_into_a_run_and_a_changed_dataset(env, capsys):
    tmp, base, image_dir = env
    assert (
        run(
            ["train", *base, "--shots", "2", "--seed", "1", "--epochs", "2", "--views", "0", "--out", str(tmp / "r")],
            capsys,
        )[0]
        == 0
    )
    before = (tmp / "r" / "metrics.json").read_text()
    code, _, err = run(["eval", "--run", str(tmp / "r"), "--quiet", "--out", str(tmp / "r")], capsys)
    assert code == 2 and "is a run folder" in err
    assert (tmp / "r" / "metrics.json").read_text() == before
    split_file = base[base.index("--split-file") + 1]
    splits = json.loads(open(split_file).read())
    splits["test"] = splits["test"][:-1]
    open(split_file, "w").write(json.dumps(splits))
    code, _, err = run(["eval", "--run", str(tmp / "r"), "--quiet"], capsys)
    assert code == 2 and "has changed since it was trained" in err


def test_coop_split_file_name_brings_the_benchmark_presets(tmp_path, openai_rn_file, capsys):
    from conftest import make_split_dataset

    image_dir, split_file = make_split_dataset(tmp_path / "flowers")
    renamed = split_file.with_name("split_zhou_OxfordFlowers.json")
    split_file.rename(renamed)
    code, _, err = run(
        [
            "train",
            "--data",
            str(image_dir),
            "--split-file",
            str(renamed),
            "--backbone",
            str(openai_rn_file),
            "--cache-dir",
            str(tmp_path / "c"),
            "--quiet",
            "--shots",
            "1",
            "--seed",
            "1",
            "--epochs",
            "2",
            "--views",
            "0",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["dataset"]["name"] == "oxford_flowers" and config["method_config"]["alpha"] == 1.0
    assert config["dataset"]["templates"] == ["a photo of a {}, a type of flower."]
