"""`taskres export`: a trained run's image encoder and head as one ONNX / TorchScript file, checked against
`predict` on real test images, with its metadata; bad runs, formats and a missing extra are exit-2 errors."""

import hashlib
import json
import re
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import make_split_dataset, run_cli

from taskres.backbones import load_backbone
from taskres.config import Setup, TrainConfig
from taskres.data.images import ImageViews
from taskres.data.sources import open_dataset
from taskres.errors import TaskResError
from taskres.export import PROBS_ATOL, export_run, read_metadata
from taskres.methods import Fitted
from taskres.methods.base import CosineHead
from taskres.methods.registry import METHODS, Method, discover
from taskres.reuse import predict
from taskres.workflow import train

TRAINED = {
    "taskres": dict(optim={"epochs": 2}, views=1),
    "clip-adapter": dict(optim={"epochs": 2}, views=1),
    "tip-adapter-f": dict(optim={"epochs": 2}, views=1),
    "tip-adapter": dict(views=1),
    "linear-probe": {},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, openai_rn_file):
    """One finished run per method on a generated 3-class dataset with the tiny ResNet CLIP."""
    root = tmp_path_factory.mktemp("export")
    image_dir, split_file = make_split_dataset(root / "data")
    dataset = open_dataset(str(image_dir), str(split_file))
    backbone = load_backbone(str(openai_rn_file))
    setup = Setup(cache_dir=str(root / "cache"), quiet=True)
    folders = {}
    for method, settings in TRAINED.items():
        config = TrainConfig.resolve(method, 2, 1, options=None, **settings)
        train(backbone, dataset, config, setup, out=root / method)
        folders[method] = root / method
    test_images = [str(image_dir / e.impath) for e in dataset.test]
    return folders, test_images, dataset.classnames


def pixels_of(images, meta):
    """The model's input as a user would make it from the metadata alone."""
    views = ImageViews(images, meta["image_size"], meta["mean"], meta["std"])
    return torch.stack([views[i][1] for i in range(len(views))])


def predict_probs(run, images, classnames):
    """(N, C) probabilities from `predict`, classes in the run's order."""
    rows = predict(run, images, Setup(cache_dir=None, quiet=True), top_k=len(classnames))
    return torch.tensor([[{t["class"]: t["prob"] for t in r["top"]}[c] for c in classnames] for r in rows])


def check_metadata(meta, run, method, classnames):
    assert meta["format"] == "taskres-export-1" and meta["method"] == method
    assert meta["class_names"] == list(classnames) and meta["image_size"] == 32
    assert meta["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert meta["std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert meta["logit_scale"] == pytest.approx(float(torch.tensor(np.log(1 / 0.07)).exp()), rel=1e-3)
    config = json.loads((run / "config.json").read_text())
    identity = meta["run"]
    assert identity["folder"] == str(run.resolve()) and identity["shots"] == 2 and identity["seed"] == 1
    assert identity["classifier_sha256"] == hashlib.sha256((run / "classifier.safetensors").read_bytes()).hexdigest()
    assert identity["backbone"] == config["backbone"] and identity["split_hash"] == config["dataset"]["split_hash"]


def test_onnx_runs_in_onnxruntime_as_predict(runs, tmp_path):
    import onnxruntime

    folders, images, classnames = runs
    out = tmp_path / "taskres.onnx"
    report = export_run(folders["taskres"], out, "onnx")
    assert report["parity"]["images"] == 8 and report["parity"]["max_abs_probs"] <= PROBS_ATOL
    meta = read_metadata(out)
    check_metadata(meta, folders["taskres"], "taskres", classnames)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    for batch in (images[:1], images):  # any batch size, not the one it was traced with
        logits, probs = session.run(None, {"image": pixels_of(batch, meta).numpy()})
        assert logits.shape == probs.shape == (len(batch), len(classnames))
        torch.testing.assert_close(
            torch.from_numpy(probs), predict_probs(folders["taskres"], batch, classnames), atol=1e-4, rtol=0
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taskres.onnx"]  # no temporary file left


@pytest.mark.parametrize("method", list(TRAINED))
def test_torchscript_runs_as_predict_for_every_head(runs, tmp_path, method):
    folders, images, classnames = runs
    out = tmp_path / f"{method}.pt"
    export_run(folders[method], out, "torchscript", n_check=4)
    files = {"taskres.json": ""}
    model = torch.jit.load(str(out), _extra_files=files)
    meta = json.loads(files["taskres.json"])
    assert meta == read_metadata(out)
    check_metadata(meta, folders[method], method, classnames)
    with torch.no_grad():
        logits, probs = model(pixels_of(images, meta))
    assert logits.shape == (len(images), len(classnames))
    torch.testing.assert_close(probs, logits.softmax(dim=-1))
    torch.testing.assert_close(probs, predict_probs(folders[method], images, classnames), atol=1e-4, rtol=0)


def test_cli_exports_a_cache_model_head_to_onnx(runs, tmp_path, capsys):
    folders, images, classnames = runs
    out = tmp_path / "sub" / "tip.onnx"
    code, stdout, err = run_cli(
        [
            "export",
            "--run",
            str(folders["tip-adapter-f"]),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--check-images",
            *images[:3],
        ],
        capsys,
    )
    assert code == 0, err
    assert "parity with predict: 3 images" in stdout and "(N, 3, 32, 32)" in stdout
    assert read_metadata(out)["method"] == "tip-adapter-f"
    # an existing file is kept unless --overwrite
    code, _, err = run_cli(
        ["export", "--run", str(folders["tip-adapter-f"]), "--format", "onnx", "--out", str(out)], capsys
    )
    assert code == 2 and "already exists" in err and "--overwrite" in err


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage, message",
    [
        ("unfinished", r"--run '.*' is incomplete \(no metrics.json\)"),
        ("tampered", "does not match its checksum"),
        ("not-a-run", "is not a run folder"),
    ],
)
def test_a_bad_run_is_exit_2_and_writes_nothing(runs, tmp_path, capsys, damage, message):
    run = copy_run(runs[0]["taskres"], tmp_path / "run")
    if damage == "unfinished":
        (run / "metrics.json").unlink()
    elif damage == "tampered":
        data = bytearray((run / "classifier.safetensors").read_bytes())
        data[-1] ^= 0x01  # one bit of the last tensor
        (run / "classifier.safetensors").write_bytes(bytes(data))
    else:
        run = tmp_path
    out = tmp_path / "m.pt"
    code, _, err = run_cli(["export", "--run", str(run), "--format", "torchscript", "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("taskres: error:") and re.search(message, err), err
    assert not out.exists()


def test_unknown_format_and_out_a_folder(runs, tmp_path, capsys):
    run = runs[0]["taskres"]
    with pytest.raises(SystemExit) as exited:  # argparse's choices
        run_cli(["export", "--run", str(run), "--format", "tflite", "--out", str(tmp_path / "m")], capsys)
    assert exited.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(TaskResError, match="format must be one of onnx, torchscript; got 'tflite'"):
        export_run(run, tmp_path / "m", "tflite")
    with pytest.raises(TaskResError, match="is a folder; pass a file path"):
        export_run(run, tmp_path, "torchscript")


def test_missing_extra_names_the_install_command(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    out = tmp_path / "m.onnx"
    code, _, err = run_cli(["export", "--run", str(runs[0]["taskres"]), "--format", "onnx", "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "needs the optional package(s) onnxruntime" in err and "pip install 'taskres[export]'" in err
    assert not out.exists()


@dataclass(frozen=True)
class NoOptions:
    pass


class NumpyHead(CosineHead):
    """A head that leaves torch for numpy (TorchScript's tracer records the example's features as a constant) and
    branches on a value in Python (torch.export, behind the ONNX exporter, refuses data-dependent control flow)."""

    def image_features(self, image_features):
        f = torch.from_numpy(image_features.detach().cpu().numpy().copy()).float()
        if bool(f.abs().sum() > 0):
            return f
        return -f

    def tensors(self):
        return {"base_text_features": self.base_text_features}

    def metadata(self):
        return {"logit_scale": float(self.logit_scale)}

    @classmethod
    def from_export(cls, tensors, meta):
        return cls(tensors["base_text_features"], meta["logit_scale"])


def test_a_head_that_does_not_export_faithfully_is_refused(runs, tmp_path, capsys, monkeypatch, openai_rn_file):
    discover()
    method = Method(
        "numpy-head",
        "test only",
        NoOptions,
        NumpyHead,
        lambda ctx, config: Fitted(NumpyHead(ctx.base, ctx.logit_scale)),
        views=0,
        test_view_only=True,
    )
    monkeypatch.setitem(METHODS, method.name, method)
    image_dir, split_file = make_split_dataset(tmp_path / "data")
    train(
        load_backbone(str(openai_rn_file)),
        open_dataset(str(image_dir), str(split_file)),
        TrainConfig(shots=2, seed=1, method="numpy-head", views=0),
        Setup(cache_dir=None, quiet=True),
        out=tmp_path / "run",
    )
    for fmt, message in (
        ("torchscript", r"disagrees with predict on 8 test images .*method 'numpy-head'"),
        ("onnx", r"method 'numpy-head' cannot be exported to onnx"),
    ):
        out = tmp_path / f"m.{fmt}"
        code, _, err = run_cli(["export", "--run", str(tmp_path / "run"), "--format", fmt, "--out", str(out)], capsys)
        assert code == 2 and "Traceback" not in err and re.search(message, err), (fmt, _, err)
        assert not out.exists() and not list(tmp_path.glob(".m.*"))


OTHERS = {
    "coop": dict(optim={"epochs": 1}, views=1, options={"n_ctx": 4}),
    "lp++": dict(views=1),
    "zs-lp": dict(optim={"epochs": 2}, views=1),
    "clap": dict(optim={"epochs": 2}, views=1),
    "classifier-adapter": dict(optim={"epochs": 2}, views=1),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(OTHERS))
def test_the_other_methods_export_to_both_formats(tmp_path, openai_rn_file, method):
    discover()
    image_dir, split_file = make_split_dataset(tmp_path / "data")
    dataset = open_dataset(str(image_dir), str(split_file))
    train(
        load_backbone(str(openai_rn_file)),
        dataset,
        TrainConfig.resolve(method, 2, 1, **OTHERS[method]),
        Setup(cache_dir=None, quiet=True),
        out=tmp_path / "run",
    )
    images = [str(image_dir / e.impath) for e in dataset.test[:4]]
    for fmt in ("torchscript", "onnx"):
        out = tmp_path / f"m.{fmt}"
        report = export_run(tmp_path / "run", out, fmt, check_images=images)
        assert report["method"] == method and read_metadata(out)["method"] == method
        assert report["parity"]["max_abs_probs"] <= PROBS_ATOL
