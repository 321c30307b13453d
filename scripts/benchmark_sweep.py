#!/usr/bin/env python
"""What a sweep costs beyond the methods' own fitting, printed as a table.

    python scripts/benchmark_sweep.py [--out DIR] [--cells-seeds 5]

On the demo model and one generated demo task, with a warm feature cache: a sweep of TaskRes cells (shots 1, 2, 4;
seeds 1..S; the zero-shot cell), timed as a whole, against the sum of the cells' fit times (``seconds_train`` in their
metrics.json): the difference per cell is the sweep's overhead (few-shot draw, reading features from memory, base
classifier, evaluation, writing the run folder). Beside it, one `taskres train` process for the same cell, timed as a
whole, minus its fit time: what a shell loop of separate processes pays per cell.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per shot count (default 5)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="taskres-sweep-bench-"))
    from taskres.demo.synthetic import write_demo_tasks

    task = write_demo_tasks(work / "tasks", seed=0, tasks=["outline_shapes"])[0]
    common = [
        "--data",
        str(task["image_dir"]),
        "--split-file",
        str(task["split_file"]),
        "--backbone",
        "taskres-demo",
        "--cache-dir",
        str(work / "cache"),
        "--quiet",
        "--device",
        "cpu",
    ]
    grid = ["--methods", "taskres", "--shots", "1,2,4", "--seeds", ",".join(str(s) for s in range(1, args.seeds + 1))]
    cli = [sys.executable, "-m", "taskres"]
    subprocess.run([*cli, "sweep", str(work / "warm"), *common, *grid], check=True)  # warms the feature cache

    t0 = time.perf_counter()
    subprocess.run([*cli, "sweep", str(work / "exp"), *common, *grid], check=True)
    sweep_wall = time.perf_counter() - t0
    metrics = [json.loads(p.read_text()) for p in (work / "exp" / "runs").rglob("metrics.json")]
    fit = sum(m.get("seconds_train", 0.0) for m in metrics)
    cells = len(metrics)

    # The same grid in this process, the backbone already loaded: the per-cell cost alone.
    from taskres.app.grid import DatasetRef, Grid
    from taskres.app.sweep import _load, run_sweep
    from taskres.config import Setup

    grid_obj = Grid(
        (DatasetRef(task["name"], data=str(task["image_dir"]), split_file=str(task["split_file"])),),
        ("taskres-demo",),
        ("taskres",),
        shots=(1, 2, 4),
        seeds=tuple(range(1, args.seeds + 1)),
    )
    setup = Setup(device="cpu", cache_dir=str(work / "cache"), quiet=True)
    _load("taskres-demo", task["name"], grid_obj, setup)
    t0 = time.perf_counter()
    run_sweep(work / "exp-inprocess", grid_obj, setup, progress=False)
    inproc_wall = time.perf_counter() - t0
    inproc = [json.loads(p.read_text()) for p in (work / "exp-inprocess" / "runs").rglob("metrics.json")]
    inproc_fit = sum(m.get("seconds_train", 0.0) for m in inproc)

    t0 = time.perf_counter()
    subprocess.run(
        [*cli, "train", *common, "--shots", "4", "--seed", "1", "--out", str(work / "single")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    single_wall = time.perf_counter() - t0
    single_fit = json.loads((work / "single" / "metrics.json").read_text())["seconds_train"]

    rows = [
        ("sweep, whole process", f"{sweep_wall:.2f} s", f"{cells} cells"),
        ("  of which fitting (sum of seconds_train)", f"{fit:.2f} s", ""),
        ("  overhead per cell, process start included", f"{(sweep_wall - fit) / cells:.3f} s", ""),
        ("sweep in a running process (backbone loaded)", f"{inproc_wall:.2f} s", f"{len(inproc)} cells"),
        ("  of which fitting", f"{inproc_fit:.2f} s", ""),
        ("  overhead per cell", f"{(inproc_wall - inproc_fit) / len(inproc):.3f} s", "target < 0.05 s"),
        ("one `taskres train` process", f"{single_wall:.2f} s", "4 shots, seed 1"),
        ("  overhead (process minus fitting)", f"{single_wall - single_fit:.3f} s", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  {'time':>10}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
