"""The peers on the demo's six generated tasks, as a table: accuracy and wall time per run, per method and shots.

    python scripts/peers_table.py EXP [--methods taskres,tip-adapter-f,clap,clip-lora] [--shots 1,4,16]
                                      [--seeds 1,2,3] [--tasks color_shapes,...] [--device cpu] [--table-only]

Runs (or resumes) the grid as ``taskres sweep`` does, on the shipped demo model, zero-shot beside every dataset; then
prints one row per method (with its grid options) and shots: the test accuracy per task (the mean over the seeds
that finished), the mean over the tasks and that mean per seed, and the median seconds per run (features +
training, from each run's metrics.json).
``--table-only`` reads finished runs without running anything (several EXP folders may be given, comma-separated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path


def run(exp: Path, methods, shots, seeds, tasks, device: str) -> None:
    from taskres.app.sweep import DatasetRef, Grid, run_sweep
    from taskres.config import Setup
    from taskres.demo.synthetic import write_demo_tasks

    written = write_demo_tasks(exp / "tasks", seed=0, tasks=tasks)
    refs = tuple(
        DatasetRef(
            t["name"], data=str(t["image_dir"]), split_file=str(t["split_file"]), templates=tuple(t["templates"])
        )
        for t in written
    )
    grid = Grid(refs, ("taskres-demo",), tuple(methods), shots=tuple(shots), seeds=tuple(seeds))
    t0 = time.perf_counter()
    run_sweep(exp, grid, Setup(device=device, cache_dir=str(exp / "cache"), quiet=True))
    print(f"sweep: {time.perf_counter() - t0:.0f} s")


def table(exps: list[Path]) -> str:
    """One row per method (with its grid options) and shots: the accuracy per task (the mean over its seeds, with n=
    where a task has fewer seeds than the row), their mean over the tasks, that mean per seed (seeds that every task
    has), and the median seconds per run. A run folder found in several experiments (zero-shot is in every one)
    counts once."""
    runs: dict[str, dict] = {}  # the run folder under runs/ -> its figures; the first experiment's wins
    for exp in exps:
        for path in sorted((exp / "runs").rglob("metrics.json")):
            rel = path.parent.relative_to(exp / "runs")
            config = json.loads((path.parent / "config.json").read_text())
            metrics = json.loads(path.read_text())
            label = "/".join(rel.parts[2:-1] if config.get("seed") is not None else rel.parts[2:])
            runs.setdefault(
                rel.as_posix(),
                {
                    "row": (int(config.get("shots") or 0), label),
                    "task": rel.parts[0],
                    "seed": config.get("seed"),
                    "accuracy": float(metrics["accuracy"]),
                    "seconds": float(metrics.get("seconds_features", 0)) + float(metrics.get("seconds_train", 0)),
                },
            )
    tasks = sorted({r["task"] for r in runs.values()})
    rows: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in runs.values():
        rows[r["row"]].append(r)
    lines = [
        "| method | shots | " + " | ".join(tasks) + " | mean over tasks | per seed | median s/run |",
        "| --- " * (len(tasks) + 5) + "|",
    ]
    for (shots, label), found in sorted(rows.items()):
        per_task = {t: [r["accuracy"] for r in found if r["task"] == t] for t in tasks}
        most = max(len(v) for v in per_task.values())
        cells = [
            (f"{statistics.fmean(v):.1f}" + (f" (n={len(v)})" if len(v) < most else "")) if v else ""
            for v in per_task.values()
        ]
        means = [statistics.fmean(v) for v in per_task.values() if v]
        mean = f"{statistics.fmean(means):.2f}" + ("" if len(means) == len(tasks) else f" ({len(means)} tasks)")
        seeds = sorted({r["seed"] for r in found if r["seed"] is not None})
        per_seed = [
            f"{s}: {statistics.fmean(r['accuracy'] for r in found if r['seed'] == s):.2f}"
            for s in seeds
            if {r["task"] for r in found if r["seed"] == s} == set(tasks)
        ]
        secs = statistics.median(r["seconds"] for r in found)
        lines.append(
            f"| {label} | {shots or '-'} | " + " | ".join(cells) + f" | {mean} | {', '.join(per_seed)} | {secs:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exp")
    p.add_argument("--methods", default="taskres,tip-adapter-f,clap,clip-lora")
    p.add_argument("--shots", default="1,4,16")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--tasks", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    exps = [Path(e) for e in args.exp.split(",")]
    if not args.table_only:
        tasks = args.tasks.split(",") if args.tasks else None
        ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
        run(exps[0], args.methods.split(","), ints(args.shots), ints(args.seeds), tasks, args.device)
    print(table(exps))


if __name__ == "__main__":
    main()
