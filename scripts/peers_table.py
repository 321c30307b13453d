"""The peers on the demo's six generated tasks, as a table: accuracy and wall time per run, per method and shots.

    python scripts/peers_table.py EXP [--methods taskres,tip-adapter-f,clap,clip-lora] [--shots 1,4,16]
                                      [--seeds 1,2,3] [--tasks color_shapes,...] [--device cpu] [--table-only]

Runs (or resumes) the grid as ``taskres sweep`` does, on the shipped demo model, zero-shot beside every dataset; then
prints one row per (method, shots): the mean test accuracy over the tasks and seeds that finished (and how many
runs), and the median seconds per run (features + training, from each run's metrics.json). ``--table-only`` reads
finished runs without running anything (several EXP folders may be given, comma-separated).
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
    cells: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for exp in exps:
        for path in sorted((exp / "runs").rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            config = json.loads((path.parent / "config.json").read_text())
            method = config.get("method", "zero-shot")
            shots = int(config.get("shots") or 0)
            seconds = float(metrics.get("seconds_features", 0)) + float(metrics.get("seconds_train", 0))
            cells[(method, shots)].append((float(metrics["accuracy"]), seconds))
    lines = ["| method | shots | runs | mean accuracy | median s/run |", "| --- | --- | --- | --- | --- |"]
    for (method, shots), values in sorted(cells.items()):
        acc = statistics.fmean(a for a, _ in values)
        secs = statistics.median(s for _, s in values)
        lines.append(f"| {method} | {shots or '-'} | {len(values)} | {acc:.2f} | {secs:.1f} |")
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
