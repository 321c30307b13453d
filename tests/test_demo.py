"""`taskres demo` end to end on the shipped model: the behaviour the paper claims must show."""

import json

import pytest

from taskres.app.cli import main


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
