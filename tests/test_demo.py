"""`taskres demo` end to end on the shipped model: the behaviour the paper claims must show."""

import csv
import json
import re
from collections import defaultdict

import numpy as np
import pytest

from taskres.app.cli import main
from taskres.app.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_shows_what_the_paper_claims(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert {"task", "method", "shots", "seed", "accuracy"} <= set(records[0])
    tasks = {r["task"] for r in records}
    assert len(tasks) >= 4
    for task in tasks:
        shots = sorted(r["shots"] for r in records if r["task"] == task and r["method"] == "taskres")
        assert shots == [1, 2, 4, 8, 16]
    zero = {r["task"]: r["accuracy"] for r in records if r["method"] == "zero-shot"}
    k16 = {r["task"]: r["accuracy"] for r in records if r["method"] == "taskres" and r["shots"] == 16}
    transfer = results["transfer"]
    near = [p["task"] for p in transfer if p["role"] == "near"]
    assert near and all(zero[t] >= 60 for t in near), zero
    hardest = max(transfer, key=lambda p: p["difficulty"])["task"]
    assert k16[hardest] - zero[hardest] >= 10, (hardest, zero, k16)
    gains = [k16[t] - zero[t] for t in tasks]
    assert sum(gains) / len(gains) >= 5, gains
    assert (out / "accuracy_vs_shots.png").stat().st_size > 1000
    assert (out / "residual_vs_difficulty.png").stat().st_size > 1000
    assert "zero-shot" in printed and hardest in printed


def test_demo_and_report_give_the_same_mean_and_std_for_every_cell(tmp_path):
    """One summary for both commands: the demo's printed table and `taskres report`'s results.csv on the same folder
    show the numpy mean and std (ddof=0, as CoOp's parse_test_res.py) of the demo's records, cell by cell."""
    out = tmp_path / "demo"
    printed: list[str] = []
    config = DemoConfig(seeds=(1, 2), shots=(1, 2), views=1, tasks=("new_shapes",))
    results = run_demo(out, config, quiet=True, echo=printed.append)
    assert [t["name"] for t in results["tasks"]] == ["new_shapes"]
    assert main(["report", str(out)]) == 0
    with open(out / "report" / "results.csv") as f:
        reported = {(r["dataset"], r["method"], int(r["shots"])): r for r in csv.DictReader(f)}
    cells = defaultdict(list)
    for r in results["records"]:
        cells[(r["task"], r["method"], r["shots"])].append(r["accuracy"])
    assert set(cells) == set(reported) and len(cells) == 3
    for key, accs in cells.items():
        row = reported[key]
        assert int(row["n_seeds"]) == len(accs) == (1 if key[1] == "zero-shot" else 2)
        assert (row["mean"], row["std"]) == (f"{np.mean(accs):.4f}", f"{np.std(accs, ddof=0):.4f}")
    [line] = [line for text in printed for line in text.splitlines() if line.startswith("new_shapes ")]
    shown = re.findall(r"(-?\d+\.\d) \+- ?(\d+\.\d)", line)  # the 1-shot and 2-shot cells: mean +- std
    taskres = [cells[("new_shapes", "taskres", k)] for k in config.shots]
    assert shown == [(f"{np.mean(a):.1f}", f"{np.std(a, ddof=0):.1f}") for a in taskres]
    assert line.split()[1] == f"{cells[('new_shapes', 'zero-shot', 0)][0]:.1f}"
    # a sample std (ddof=1) would have printed another number in at least one cell
    assert any(f"{np.std(a, ddof=1):.1f}" != std for a, (_, std) in zip(taskres, shown))
    assert (out / "accuracy_vs_shots.png").is_file() and (out / "residual_vs_difficulty.png").is_file()
