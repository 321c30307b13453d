"""The device a run names is the device it computes on, and the numbers do not depend on it beyond rounding.

On the CPU by default. ``TASKRES_TEST_DEVICE=cuda`` (what ``scripts/gpu_check.sh`` sets) runs the same tests on a
GPU, where they catch what the CPU cannot: the device-placement mistakes that survive mutation testing on the CPU
(docs/mutation.md: a ``.to(None)``, a dropped ``device``, a misspelt "cuda", unpinned batches), each of which leaves
a tensor on the CPU (an error) or a run on the wrong device.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open

from taskres.engine import OptimConfig, fit
from taskres.methods.taskres import TaskResConfig, TaskResHead

DEVICE = os.environ.get("TASKRES_TEST_DEVICE", "cpu")


@pytest.fixture()
def device() -> torch.device:
    dev = torch.device(DEVICE)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"TASKRES_TEST_DEVICE={DEVICE} but torch sees no GPU")  # never a silent skip
    return dev


def _problem(c: int = 5, d: int = 16, n: int = 40):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(c, d, generator=g)
    labels = torch.arange(c).repeat(n // c)
    feats = base[labels] + 0.8 * torch.randn(n, d, generator=g)
    return base, feats, labels


@pytest.mark.parametrize(
    "config,optim",
    [
        (TaskResConfig(), OptimConfig(lr=1e-2, epochs=4, batch_size=16)),  # the closed-form step, fused Adam
        (TaskResConfig(variant="both", learn_alpha=True), OptimConfig(lr=1e-2, epochs=4, batch_size=16)),  # autograd
        (TaskResConfig(), OptimConfig(lr=1e-2, epochs=4, batch_size=16, optimizer="sgd")),  # fused SGD
    ],
    ids=["closed-form", "autograd", "sgd"],
)
def test_fit_trains_on_the_device_and_matches_the_cpu(device, config, optim):
    base, feats, labels = _problem()
    trained = {}
    for dev in (torch.device("cpu"), device):
        head = TaskResHead(base, 100.0, config)
        log = fit(head, feats, labels, optim, seed=1, device=dev, quiet=True)
        assert len(log) == optim.epochs and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
        assert {p.device.type for p in head.parameters()} == {dev.type}  # trained where the run said
        trained[dev.type] = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    for key, value in trained["cpu"].items():  # only rounding between devices (all equal on the CPU)
        torch.testing.assert_close(trained[device.type][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_cli_train_and_eval_on_the_device(env, capsys, device):
    tmp, base, _ = env
    args = [a if a != "cpu" else str(device) for a in base]  # the fixture's "--device cpu"
    assert str(device) in args
    train = ["train", "--shots", "4", "--seed", "1", "--epochs", "5", "--views", "2"]
    for name, argv in (("cpu", base), ("dev", args)):
        code, _, err = run_cli([*train, *argv, "--cache-dir", str(tmp / f"cache-{name}"), "--out", str(tmp / name)],
                               capsys)  # fmt: skip
        assert code == 0, err
    cpu, dev = (json.loads((tmp / n / "metrics.json").read_text()) for n in ("cpu", "dev"))
    assert dev["accuracy"] == pytest.approx(cpu["accuracy"]) and dev["n_test"] == cpu["n_test"] == 12
    tensors = []
    for name in ("cpu", "dev"):
        with safe_open(str(tmp / name / "classifier.safetensors"), "pt") as f:
            tensors.append(f.get_tensor("text_feature_residuals"))
    torch.testing.assert_close(tensors[1], tensors[0], rtol=1e-3, atol=1e-5)
    code, _, err = run_cli(["eval", "--run", str(tmp / "dev"), "--quiet", "--device", str(device),
                            "--out", str(tmp / "ev")], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp / "ev" / "metrics.json").read_text())["accuracy"] == pytest.approx(dev["accuracy"])


@pytest.mark.slow
def test_cli_half_precision_on_a_gpu(env, capsys, device):
    """fp16 runs the text encoder in half precision on the backbone's device (a GPU only)."""
    if device.type != "cuda":
        pytest.skip("half precision is for GPUs; set TASKRES_TEST_DEVICE=cuda")
    tmp, base, _ = env
    args = [a if a != "cpu" else str(device) for a in base]
    code, _, err = run_cli(["zeroshot", *args, "--precision", "fp16", "--out", str(tmp / "zs16")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp / "zs16" / "metrics.json").read_text())
    assert metrics["n_test"] == 12 and 0 <= metrics["accuracy"] <= 100
