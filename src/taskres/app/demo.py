"""`taskres demo`: the whole pipeline, offline, on the shipped miniature CLIP and generated downstream tasks.

Zero-shot and TaskRes at 1, 2, 4, 8, 16 shots on every task, through the same code path as real data (split files
on disk, the backbone loader, the feature cache, the engine, run folders).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from taskres.app.reports import accuracy_table, plot_accuracy_vs_shots, plot_residual_vs_difficulty
from taskres.atomic import write_text
from taskres.backbones import load_backbone
from taskres.data.sources import open_dataset
from taskres.demo.synthetic import write_demo_tasks
from taskres.engine import OptimConfig
from taskres.methods.taskres import TaskResConfig
from taskres.workflow import Setup, TrainConfig, train, zeroshot

logger = logging.getLogger(__name__)

SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings: the paper's TaskRes hyper-parameters (alpha 0.5, lr 2e-3, 100/200 epochs, batch 256)."""

    seeds: tuple[int, ...] = (1, 2, 3)
    shots: tuple[int, ...] = SHOTS
    views: int = 10
    data_seed: int = 0


def run_demo(out: str | Path, config: DemoConfig = DemoConfig(), device: str = "cpu", quiet: bool = False,
             echo=print) -> dict:
    """Generate the tasks under ``out/tasks``, run everything, write ``out/results.json`` and the plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tasks = write_demo_tasks(out / "tasks", seed=config.data_seed)
    echo(f"generated {len(tasks)} tasks in {time.perf_counter() - t0:.1f} s under {out / 'tasks'}")
    backbone = load_backbone("taskres-demo", device=device)
    setup = Setup(device=device, cache_dir=str(out / "cache"), quiet=True)
    records, points = [], []
    for task in tasks:
        data = open_dataset(task["image_dir"], task["split_file"], task["templates"])
        zs = zeroshot(backbone, data, setup, out=out / "runs" / task["name"] / "zero-shot", overwrite=True)
        records.append({"task": task["name"], "method": "zero-shot", "shots": 0, "seed": None,
                        "accuracy": zs["accuracy"]})
        residuals = []
        for shots in config.shots:
            for seed in config.seeds:
                train_config = TrainConfig(
                    shots=shots, seed=seed, views=config.views, method_config=TaskResConfig(alpha=0.5),
                    optim=OptimConfig(lr=2e-3, epochs=100 if shots <= 4 else 200, batch_size=256))
                head, metrics = train(backbone, data, train_config, setup, overwrite=True,
                                      out=out / "runs" / task["name"] / f"taskres-{shots}shot-seed{seed}")
                records.append({"task": task["name"], "method": "taskres", "shots": shots, "seed": seed,
                                "accuracy": metrics["accuracy"]})
                if shots == max(config.shots):
                    residuals.append(head.residual_mean_abs())
        difficulty = (1.0 / data.num_classes) / max(zs["accuracy"] / 100.0, 1e-6)
        points.append({"task": task["name"], "role": task["role"], "difficulty": difficulty,
                       "residual": sum(residuals) / len(residuals), "num_classes": data.num_classes,
                       "zero_shot_accuracy": zs["accuracy"]})
        if not quiet:
            echo(f"  {task['name']}: done ({time.perf_counter() - t0:.0f} s)")
    results = {"records": records, "tasks": [{k: str(v) if isinstance(v, Path) else v for k, v in t.items()}
                                             for t in tasks],
               "transfer": points, "config": {"seeds": list(config.seeds), "shots": list(config.shots),
                                              "views": config.views}, "seconds": round(time.perf_counter() - t0, 1)}
    write_text(out / "results.json", json.dumps(results, indent=2))
    plot_accuracy_vs_shots(records, out / "accuracy_vs_shots.png")
    plot_residual_vs_difficulty(points, out / "residual_vs_difficulty.png")
    echo(accuracy_table(records, config.shots))
    echo("\nrelative transfer difficulty and residual magnitude (16 shots):")
    for p in sorted(points, key=lambda p: p["difficulty"]):
        echo(f"  {p['task']:<18} difficulty {p['difficulty']:.3f}   mean |x| {p['residual']:.5f}")
    echo(f"\nwrote {out / 'results.json'}, {out / 'accuracy_vs_shots.png'}, {out / 'residual_vs_difficulty.png'} "
         f"in {results['seconds']:.0f} s")
    return results
