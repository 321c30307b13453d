"""The wheel: built from the project files alone, it carries the shipped demo model and py.typed, and installed into a
fresh environment that cannot see the source tree, `taskres demo` runs from it."""

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_the_wheel_installs_alone_and_runs_the_demo(tmp_path):
    # Build from a copy of the files a release is made of (no build outputs land in the checkout).
    src = tmp_path / "src-copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run(
        [sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", "-q"],
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("taskres-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "taskres/assets/taskres-demo.safetensors",
        "taskres/assets/taskres-demo.json",
        "taskres/assets/taskres-demo.recipe.json",
        "taskres/py.typed",
        "taskres/app/cli.py",
    } <= names

    # A fresh environment: its own site-packages first, then this environment's site-packages for torch and the
    # other dependencies (a path in a .pth file: the .pth files there, such as an editable taskres, are not run).
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (site / "outer-dependencies.pth").write_text("\n".join(ours) + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    clean.update(HOME=str(tmp_path / "home"), TASKRES_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], env=clean, cwd=tmp_path)
    where = run([python, "-c", "import taskres, torch; print(taskres.__file__)"], env=clean, cwd=tmp_path).strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout's

    out = tmp_path / "demo"
    run(
        [
            env_dir / "bin" / "taskres",
            "demo",
            "--out",
            out,
            "--seeds",
            "1",
            "--views",
            "0",
            "--quiet",
            "--device",
            "cpu",
        ],
        env=clean,
        cwd=tmp_path,
        timeout=300,
    )
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert {r["method"] for r in records} == {"zero-shot", "taskres"}
    assert len({r["task"] for r in records}) >= 4 and all(0 <= r["accuracy"] <= 100 for r in records)
    assert results["config"] == {"seeds": [1], "shots": [1, 2, 4, 8, 16], "views": 0}
