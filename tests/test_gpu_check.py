"""scripts/gpu_check.sh, the check prepared for a lent GPU, runs its CPU parts here (``--dry-run``) so it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_dry_run_prints_its_table():
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("step ") :].splitlines()
    rows = {line[:34].strip(): line[34:].split() for line in table[1:] if line[:34].strip()}
    expected = ["device tests (cpu)", "extraction RN50 fp32", "training, 2 epochs", "torchrun 1 process (gloo)"]
    for name in expected:
        assert rows[name][0] == "ok" and float(rows[name][1]) > 0, table
    assert "1 passed" in " ".join(rows["device tests (cpu)"])  # the device tests ran, not just the script
    assert "extraction" in " ".join(rows["extraction RN50 fp32"])  # the benchmark's row, with its figures


def test_gpu_check_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: scripts/gpu_check.sh [--dry-run]" in done.stderr
