"""`taskres demo`: the whole pipeline, offline, on the shipped miniature CLIP and generated downstream tasks.

Zero-shot and TaskRes at 1, 2, 4, 8, 16 shots on every task, as a sweep (the `taskres sweep` code path: split files
on disk, the backbone loader, the feature cache, the engine, one run folder per cell under ``OUT/runs``), then the
table, ``results.json`` and the plots from the run folders (the `taskres report` reader). A rerun resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from taskres.app.report import collect
from taskres.app.reports import accuracy_table, plot_accuracy_vs_shots, plot_residual_vs_difficulty
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
        tasks = write_demo_tasks(out / "tasks", seed=config.data_seed)
        echo(f"generated {len(tasks)} tasks in {time.perf_counter() - t0:.1f} s under {out / 'tasks'}")
    tasks = cluster.gather(tasks, "writing the demo tasks")[0]
    setup = Setup(device=device, cache_dir=str(out / "cache"), quiet=True)
    counts = run_sweep(out, demo_grid(tasks, config), setup, extend=True, progress=not quiet, replace_stale=True)
    if not cluster.is_main:
        return {}
    if counts["failed"]:
        raise TaskResError(f"{counts['failed']} demo run(s) failed; see {out / 'failures.jsonl'}.")
    runs = [r for r in collect(out) if not r["eval_dataset"]]
    names = {t["name"] for t in tasks}
    runs = [
        r
        for r in runs
        if r["dataset"] in names
        and r["method"] in ("zero-shot", "taskres")
        and (r["method"] == "zero-shot" or (r["shots"] in config.shots and r["seed"] in config.seeds))
    ]
    order = {t["name"]: i for i, t in enumerate(tasks)}
    runs.sort(key=lambda r: (order[r["dataset"]], r["method"] != "zero-shot", r["shots"], r["seed"] or 0))
    records = [
        {"task": r["dataset"], "method": r["method"], "shots": r["shots"], "seed": r["seed"], "accuracy": r["accuracy"]}
        for r in runs
    ]
    residuals: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        if r["method"] == "taskres" and r["shots"] == max(config.shots):
            residuals[r["dataset"]].append(r["residual_mean_abs"])
    zero = {r["dataset"]: r for r in runs if r["method"] == "zero-shot"}
    points = []
    for task in tasks:
        zs = zero[task["name"]]
        points.append(
            {
                "task": task["name"],
                "role": task["role"],
                "difficulty": (1.0 / zs["num_classes"]) / max(zs["accuracy"] / 100.0, 1e-6),
                "residual": sum(residuals[task["name"]]) / len(residuals[task["name"]]),
                "num_classes": zs["num_classes"],
                "zero_shot_accuracy": zs["accuracy"],
            }
        )
    results = {
        "records": records,
        "tasks": [{k: str(v) if isinstance(v, Path) else v for k, v in t.items()} for t in tasks],
        "transfer": points,
        "config": {"seeds": list(config.seeds), "shots": list(config.shots), "views": config.views},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_text(out / "results.json", json.dumps(results, indent=2))
    plot_accuracy_vs_shots(records, out / "accuracy_vs_shots.png")
    plot_residual_vs_difficulty(points, out / "residual_vs_difficulty.png")
    echo(accuracy_table(records, config.shots))
    echo("\nrelative transfer difficulty and residual magnitude (16 shots):")
    for p in sorted(points, key=lambda p: p["difficulty"]):
        echo(f"  {p['task']:<18} difficulty {p['difficulty']:.3f}   mean |x| {p['residual']:.5f}")
    echo(
        f"\nwrote {out / 'results.json'}, {out / 'accuracy_vs_shots.png'}, {out / 'residual_vs_difficulty.png'} "
        f"in {results['seconds']:.0f} s"
    )
    return results
