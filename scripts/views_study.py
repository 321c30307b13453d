#!/usr/bin/env python
"""Do cached augmented views give the accuracy of the official online augmentation? The study behind `--views`.

    python scripts/views_study.py --out study-out          # about 20 minutes on 2 CPU cores (--jobs 2)
    python scripts/views_study.py --out study-out --report-only --doc docs/views-study.md
    # the records behind docs/views-study.md are in docs/views-study-records.json (copy it to OUT/records.json)

On the shipped demo model (`taskres-demo`) and its six generated tasks, at 1, 4 and 16 shots and seeds 1-5, TaskRes
and CLIP-Adapter (whose image-side MLP could overfit a small bank) are trained with their presets under
`--views online` (a fresh augmentation of every image in every epoch, encoded as it trains, as the official
trainer) and with banks of V = 0, 1, 2, 5, 10, 20, 50 cached views. Every run of a (task, shots, seed) sees the same
few-shot images, base classifier and test features; only the training views differ. For each setting the script
records the test accuracy, the paired difference to online (same task, shots, seed and method), the encoder passes
spent on training images, and the wall time (encoding the views cold, without a disk cache, plus training).

The default `--views` is the smallest bank whose paired difference to online has a 95% interval (t, over the
tasks x seeds pairs) containing 0 at every shot count, for both methods, and whose mean difference over all pairs is
within 0.5 points, for both methods. If no bank qualifies, online should be the default.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SETTINGS = ("online", 0, 1, 2, 5, 10, 20, 50)
METHODS = ("taskres", "clip-adapter")
SHOTS = (1, 4, 16)
SEEDS = (1, 2, 3, 4, 5)


def run_unit(unit: tuple[str, str, str, int, int]) -> list[dict]:
    """Every setting and method for one (task, shots, seed): one few-shot draw, one base, one test encoding."""
    import torch

    torch.set_num_threads(1)
    from taskres.backbones import load_backbone
    from taskres.cache import FeatureCache
    from taskres.config import Setup, TrainConfig
    from taskres.data.sampling import sample_fewshot
    from taskres.data.sources import open_dataset
    from taskres.evaluate import evaluate
    from taskres.features import encode_features, train_encoder_passes
    from taskres.text import build_base_classifier
    from taskres.workflow import fit_method

    task, image_dir, split_file, shots, seed = unit
    backbone = load_backbone("taskres-demo")
    dataset = open_dataset(image_dir, split_file)
    setup = Setup(batch_size=256, quiet=True)
    fewshot = sample_fewshot(dataset, shots, seed)
    base = build_base_classifier(backbone, dataset.classnames, dataset.templates)
    test_cache = FeatureCache(None, batch_size=256, quiet=True)
    records = []
    for setting in SETTINGS:
        t0 = time.perf_counter()
        # A cold encoding of this setting's views (no disk cache), so that the wall time counts it.
        features = encode_features(
            backbone,
            dataset,
            fewshot,
            setting,
            setup,
            seed=seed,
            cache=_Cold(test_cache, FeatureCache(None, batch_size=256, quiet=True)),
        )
        t_encode = time.perf_counter() - t0
        for method in METHODS:
            config = TrainConfig.preset(method, shots, seed, dataset="", views=setting)
            t1 = time.perf_counter()
            fitted = fit_method(config, features, base, backbone, dataset, setup)
            t_fit = time.perf_counter() - t1
            acc = evaluate(fitted.head, features.test, features.test_labels, dataset.classnames)["accuracy"]
            passes = train_encoder_passes(features)
            if setting == "online":  # the online source counts every epoch of every method run on it
                passes = passes - sum(r["encoder_passes"] for r in records if r["views"] == "online")
            records.append(
                {
                    "task": task,
                    "shots": shots,
                    "seed": seed,
                    "method": method,
                    "views": setting,
                    "accuracy": acc,
                    "encoder_passes": passes,
                    "seconds": round((t_encode if setting != "online" else 0.0) + t_fit, 3),
                }
            )
    return records


class _Cold:
    """The test and val splits from one shared cache, the training views from a fresh one (cold)."""

    def __init__(self, shared, fresh):
        self.shared, self.fresh = shared, fresh

    def features(self, backbone, paths, view=None, **kw):
        return (self.shared if view is None and kw.get("desc") in ("test", "val") else self.fresh).features(
            backbone, paths, view=view, **kw
        )


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean."""
    from scipy.stats import t

    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def analyse(records: list[dict]) -> dict:
    online = {(r["task"], r["shots"], r["seed"], r["method"]): r["accuracy"] for r in records if r["views"] == "online"}
    rows = []
    for method in METHODS:
        for setting in SETTINGS:
            for shots in (*SHOTS, "all"):
                sel = [
                    r
                    for r in records
                    if r["method"] == method and r["views"] == setting and (shots == "all" or r["shots"] == shots)
                ]
                if not sel:
                    continue
                diffs = [r["accuracy"] - online[(r["task"], r["shots"], r["seed"], method)] for r in sel]
                mean_diff, low, high = t_interval(diffs) if setting != "online" else (0.0, 0.0, 0.0)
                rows.append(
                    {
                        "method": method,
                        "views": setting,
                        "shots": shots,
                        "n": len(sel),
                        "accuracy": statistics.fmean(r["accuracy"] for r in sel),
                        "diff": mean_diff,
                        "low": low,
                        "high": high,
                        "encoder_passes": statistics.fmean(r["encoder_passes"] for r in sel),
                        "seconds": statistics.fmean(r["seconds"] for r in sel),
                    }
                )
    chosen = None
    for setting in SETTINGS[1:]:
        ok = True
        for method in METHODS:
            per_shot = [r for r in rows if r["method"] == method and r["views"] == setting and r["shots"] != "all"]
            pooled = next(r for r in rows if r["method"] == method and r["views"] == setting and r["shots"] == "all")
            ok &= all(r["low"] <= 0 <= r["high"] for r in per_shot) and abs(pooled["diff"]) <= 0.5
        if ok:
            chosen = setting
            break
    return {"rows": rows, "default": chosen if chosen is not None else "online"}


def write_doc(analysis: dict, records: list[dict], doc: Path, plot: Path, wall: float | None) -> None:
    rows = analysis["rows"]
    lines = [
        "# Cached views against online augmentation",
        "",
        "Made by `python scripts/views_study.py` (its docstring says what it runs). Demo model `taskres-demo`, "
        "its six generated tasks, 1/4/16 shots, seeds 1-5; TaskRes and CLIP-Adapter with their presets "
        "(TaskRes: Adam lr 2e-3, 100/200 epochs, batch 256; CLIP-Adapter: SGD lr 2e-3, 50/100/200 epochs, "
        "batch 32). `diff` is the paired difference to `--views online` in accuracy points (same task, shots, "
        "seed, method), with its 95% t interval over the 30 task x seed pairs (90 for `all`). Encoder passes "
        "count training images run through the image encoder per run (the test split, encoded once per "
        "dataset, is the same for every setting and left out); seconds are per run on one CPU thread "
        "(encoding the setting's views cold, plus training).",
        "",
    ]
    for method in METHODS:
        lines += [
            f"## {method}",
            "",
            "| views | shots | accuracy | diff to online | 95% interval | encoder passes | seconds |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            if r["method"] != method:
                continue
            interval = "" if r["views"] == "online" else f"[{r['low']:+.2f}, {r['high']:+.2f}]"
            diff = "" if r["views"] == "online" else f"{r['diff']:+.2f}"
            lines.append(
                f"| {r['views']} | {r['shots']} | {r['accuracy']:.2f} | {diff} | {interval} | "
                f"{r['encoder_passes']:.0f} | {r['seconds']:.2f} |"
            )
        lines.append("")
    lines += [
        "## Verdict",
        "",
        f"Default chosen by the rule in the script's docstring: **`--views {analysis['default']}`**.",
        "",
    ]
    if wall is not None:
        lines += [f"The whole study ran in {wall / 60:.1f} minutes.", ""]
    lines += [f"![accuracy against encoder passes]({plot.name})", ""]
    doc.write_text("\n".join(lines))
    _plot(rows, plot)


def _plot(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    for k, method in enumerate(METHODS):
        ax = fig.add_subplot(1, 2, k + 1)
        for j, shots in enumerate(SHOTS):
            sel = [r for r in rows if r["method"] == method and r["shots"] == shots and r["views"] != "online"]
            ax.errorbar(
                [r["encoder_passes"] for r in sel],
                [r["diff"] for r in sel],
                yerr=[[r["diff"] - r["low"] for r in sel], [r["high"] - r["diff"] for r in sel]],
                marker="o",
                capsize=3,
                color=f"C{j}",
                label=f"{shots} shots",
            )
            online = next(r for r in rows if r["method"] == method and r["shots"] == shots and r["views"] == "online")
            ax.axvline(online["encoder_passes"], color=f"C{j}", linestyle=":", linewidth=1)
            for r in sel:
                ax.annotate(
                    str(r["views"]),
                    (r["encoder_passes"], r["diff"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("encoder passes on training images per run (dotted: online)")
        ax.set_ylabel("accuracy - online accuracy (points)")
        ax.set_title(method)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="views-study", help="work folder (tasks, records.json)")
    parser.add_argument("--doc", default="docs/views-study.md", help="the Markdown report to write")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/records.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records_file = out / "records.json"
    wall = None
    if not args.report_only:
        from taskres.demo.synthetic import write_demo_tasks

        t0 = time.perf_counter()
        tasks = write_demo_tasks(out / "tasks", seed=0)
        units = [
            (t["name"], str(t["image_dir"]), str(t["split_file"]), shots, seed)
            for shots in sorted(SHOTS, reverse=True)
            for t in tasks
            for seed in SEEDS
        ]
        records = []
        with ProcessPoolExecutor(args.jobs) as pool:
            for i, recs in enumerate(pool.map(run_unit, units), 1):
                records += recs
                print(
                    f"{i}/{len(units)} {recs[0]['task']} {recs[0]['shots']}-shot seed {recs[0]['seed']} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        wall = time.perf_counter() - t0
        records_file.write_text(json.dumps({"records": records, "seconds": wall}, indent=1))
    data = json.loads(records_file.read_text())
    analysis = analyse(data["records"])
    doc = Path(args.doc)
    write_doc(analysis, data["records"], doc, doc.with_suffix(".png"), data.get("seconds"))
    print(f"default: --views {analysis['default']}; wrote {doc}")


if __name__ == "__main__":
    main()
