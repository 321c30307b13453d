"""`taskres demo`: the whole pipeline, offline, on the shipped miniature CLIP and generated downstream tasks.

Zero-shot and TaskRes at 1, 2, 4, 8, 16 shots on every task, as a sweep (the `taskres sweep` code path: split files
on disk, the backbone loader, the feature cache, the engine, one run folder per cell under ``OUT/runs``), then the
table, ``results.json``, the plots and ``report/index.html`` from the run folders with `taskres report`'s reader,
summaries (mean and numpy std, ddof=0, over seeds), figures and page. A rerun resumes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from taskres.app.report import (
    ZERO_SHOT,
    collect,
    console_table,
    difficulty_points,
    plot_accuracy,
    plot_difficulty,
    summarise,
    write_html,
)
from taskres.app.sweep import DatasetRef, Grid, run_sweep
from taskres.atomic import write_text
from taskres.config import Setup
from taskres.demo.synthetic import write_demo_tasks
from taskres.errors import TaskResError

logger = logging.getLogger(__name__)

SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings: the paper's TaskRes hyper-parameters (alpha 0.5, lr 2e-3, 100/200 epochs, batch 256),
    10 cached views to stay quick (docs/views-study.md: 0.43 points below online on average on these tasks)."""

    seeds: tuple[int, ...] = (1, 2, 3)
    shots: tuple[int, ...] = SHOTS
    views: int = 10
    data_seed: int = 0
    tasks: tuple[str, ...] | None = None  # a subset of the generated tasks (default all six)


def demo_grid(tasks: list[dict], config: DemoConfig) -> Grid:
    """The demo as a sweep: every task, the shipped model, TaskRes with alpha 0.5 (zero-shot comes with it)."""
    return Grid(
        tuple(
            DatasetRef(
                t["name"], data=str(t["image_dir"]), split_file=str(t["split_file"]), templates=tuple(t["templates"])
            )
            for t in tasks
        ),
        ("taskres-demo",),
        ("taskres",),
        shots=tuple(config.shots),
        seeds=tuple(config.seeds),
        options={"--alpha": 0.5},
        views=config.views,
    )


def run_demo(
    out: str | Path, config: DemoConfig = DemoConfig(), device: str = "cpu", quiet: bool = False, echo=print
) -> dict:
    """Generate the tasks under ``out/tasks``, run the grid, write ``out/results.json`` and the plots."""
    from taskres import distributed

    cluster = distributed.current()  # under torchrun: rank 0 writes the tasks, the ranks share the sweep
    out = Path(out)
    t0 = time.perf_counter()
    tasks = None
    if cluster.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tasks = write_demo_tasks(out / "tasks", seed=config.data_seed, tasks=config.tasks)
        echo(f"generated {len(tasks)} tasks in {time.perf_counter() - t0:.1f} s under {out / 'tasks'}")
    tasks = cluster.gather(tasks, "writing the demo tasks")[0]
    setup = Setup(device=device, cache_dir=str(out / "cache"), quiet=True)
    counts = run_sweep(out, demo_grid(tasks, config), setup, extend=True, progress=not quiet, replace_stale=True)
    if not cluster.is_main:
        return {}
    if counts["failed"]:
        raise TaskResError(f"{counts['failed']} demo run(s) failed; see {out / 'failures.jsonl'}.")
    runs = demo_runs(collect(out), tasks, config)
    rows = summarise(runs)
    results = _results(runs, tasks, config, t0)
    write_text(out / "results.json", json.dumps(results, indent=2))
    plot_accuracy(rows, out / "accuracy_vs_shots", suffixes=(".png",))
    plot_difficulty(runs, out / "residual_vs_difficulty", suffixes=(".png",))
    (out / "report").mkdir(exist_ok=True)
    write_html(out, out / "report", rows, runs)
    _print_results(echo, out, rows, results, tasks, config)
    return results


def _results(runs: list[dict], tasks: list[dict], config: DemoConfig, t0: float) -> dict:
    """results.json: one record per run, the tasks, the Fig. 4 points, the settings and the wall time."""
    keys = {"task": "dataset", "method": "method", "shots": "shots", "seed": "seed", "accuracy": "accuracy"}
    return {
        "records": [{k: r[field] for k, field in keys.items()} for r in runs],
        "tasks": [{k: str(v) if isinstance(v, Path) else v for k, v in t.items()} for t in tasks],
        "transfer": transfer_points(runs, tasks),
        "config": {"seeds": list(config.seeds), "shots": list(config.shots), "views": config.views},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def demo_runs(records: list[dict], tasks: list[dict], config: DemoConfig) -> list[dict]:
    """The demo's records of the experiment folder: its tasks, zero-shot and TaskRes at its shots and seeds (a
    rerun with fewer of them leaves the others' folders), in task order, then by method, shots and seed."""
    names = {t["name"] for t in tasks}
    runs = [
        r
        for r in records
        if not r["eval_dataset"]
        and r["dataset"] in names
        and r["method"] in (ZERO_SHOT, "taskres")
        and (r["method"] == ZERO_SHOT or (r["shots"] in config.shots and r["seed"] in config.seeds))
    ]
    order = {t["name"]: i for i, t in enumerate(tasks)}
    return sorted(runs, key=lambda r: (order[r["dataset"]], r["method"] != ZERO_SHOT, r["shots"], r["seed"] or 0))


def transfer_points(runs: list[dict], tasks: list[dict]) -> list[dict]:
    """Per task: its relative transfer difficulty and TaskRes's mean |residual| at the largest shot count (the
    report's Fig. 4 points), with the zero-shot run's accuracy and number of classes."""
    points = {d: (x, y) for pts in difficulty_points(runs).values() for d, x, y in pts}
    zero = {r["dataset"]: r for r in runs if r["method"] == ZERO_SHOT}
    return [
        {
            "task": t["name"],
            "role": t["role"],
            "difficulty": points[t["name"]][0],
            "residual": points[t["name"]][1],
            "num_classes": zero[t["name"]]["num_classes"],
            "zero_shot_accuracy": zero[t["name"]]["accuracy"],
        }
        for t in tasks
    ]


def _print_results(echo, out: Path, rows: list[dict], results: dict, tasks: list[dict], config: DemoConfig) -> None:
    echo(console_table(rows, [t["name"] for t in tasks], config.shots))
    echo(f"\nrelative transfer difficulty and residual magnitude ({max(config.shots)} shots):")
    for p in sorted(results["transfer"], key=lambda p: p["difficulty"]):
        echo(f"  {p['task']:<18} difficulty {p['difficulty']:.3f}   mean |x| {p['residual']:.5f}")
    echo(
        f"\nwrote {out / 'results.json'}, {out / 'accuracy_vs_shots.png'}, {out / 'residual_vs_difficulty.png'}, "
        f"{out / 'report' / 'index.html'} in {results['seconds']:.0f} s"
    )
