"""`taskres report EXP`: the paper's tables and figures from an experiment folder. Reads run folders, never trains.

EXP/report/results.csv     dataset,backbone,method,shots,n_seeds,mean,std[,eval_dataset]   (std: numpy, ddof=0,
                           as CoOp's parse_test_res.py)
EXP/report/results.md      per backbone: methods x shots per dataset, the average over datasets, the DG table
EXP/report/accuracy_vs_shots.{png,svg}        one panel per dataset plus the average, +- std bands (Fig. 3)
EXP/report/residual_vs_difficulty.{png,svg}   TaskRes residual magnitude against transfer difficulty (Fig. 4)
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from taskres.errors import TaskResError

ZERO_SHOT = "zero-shot"
PUBLISHED = Path(__file__).resolve().parents[1] / "assets" / "published.json"


def method_label(config: dict) -> str:
    """The grid's name of a run's method: TaskRes with the enhanced base is ``taskres*``."""
    method = config.get("method", "?")
    mc = config.get("method_config") or {}
    if method == "taskres" and (mc.get("enhance_base") or mc.get("base_weights")):
        return "taskres*"
    return method


def grid_options(exp: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(grid option name, config field, the methods that take it) of the experiment's --grid options, from
    EXP/sweep.json."""
    from taskres.methods.registry import option_flags

    path = exp / "sweep.json"
    names = list(json.loads(path.read_text()).get("grid") or {}) if path.is_file() else []
    flags = option_flags()
    return [(n, *flags["--" + n.replace("_", "-")]) for n in names if "--" + n.replace("_", "-") in flags]


def collect(exp: str | Path) -> list[dict]:
    """One record per finished run folder under EXP/runs (and one per eval-<dataset> folder inside it)."""
    options = grid_options(Path(exp))
    runs = Path(exp) / "runs"
    if not runs.is_dir():
        raise TaskResError(
            f"{str(exp)!r} is not an experiment folder (no runs/); pass a folder written by `taskres sweep`."
        )
    records = []
    for metrics_file in sorted(runs.rglob("metrics.json")):
        folder = metrics_file.parent
        config_file = folder / "config.json"
        if any(part.startswith(".") for part in folder.relative_to(runs).parts):
            continue  # a run being written, or left by a killed writer (.RUN.taskres-tmp-*)
        if not config_file.is_file():
            continue  # an eval-<dataset> folder: read with its run
        config = json.loads(config_file.read_text())
        if config.get("kind") not in ("train", "zeroshot"):
            continue  # e.g. an imported official checkpoint: no shots or seed to place it in the grid
        metrics = json.loads(metrics_file.read_text())
        zero = config.get("kind") == "zeroshot"
        mc = config.get("method_config") or {}
        values = tuple(
            (n, _text(mc[f]) if not zero and f in mc and config.get("method") in takers else "")
            for n, f, takers in options
        )
        label = ZERO_SHOT if zero else method_label(config)
        shown = ", ".join(f"{n}={v}" for n, v in values if v != "")
        base = {
            "dataset": config["dataset"]["name"],
            "backbone": config["backbone"]["spec"],
            "method": f"{label} ({shown})" if shown else label,
            "options": values,
            "shots": 0 if zero else config["shots"],
            "seed": None if zero else config["seed"],
            "protocol": config.get("protocol", "default"),
            "num_classes": config["dataset"].get("num_classes"),
            "run": str(folder),
        }
        records.append(
            {
                **base,
                "eval_dataset": "",
                "accuracy": metrics["accuracy"],
                "zero_shot_accuracy": metrics.get("zero_shot_accuracy"),
                "residual_mean_abs": metrics.get("residual_mean_abs"),
                "test_selected": bool(metrics.get("test_selected", False)),
            }
        )
        for ev in sorted(folder.glob("eval-*/metrics.json")):
            m = json.loads(ev.read_text())
            records.append({**base, "eval_dataset": m.get("dataset", ev.parent.name[5:]), "accuracy": m["accuracy"]})
    if not records:
        raise TaskResError(f"experiment {str(exp)!r} has no finished runs yet; run `taskres sweep` first.")
    return records


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def summarise(records: list[dict]) -> list[dict]:
    """Rows (dataset, backbone, method, grid options, shots, eval_dataset) -> n_seeds, mean, std (ddof=0), in %."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["backbone"], r["method"], r.get("options", ()), r["shots"], r["eval_dataset"])].append(
            r["accuracy"]
        )
    return [
        {
            "dataset": d,
            "backbone": b,
            "method": m,
            "options": o,
            "shots": k,
            "eval_dataset": e,
            "n_seeds": len(v),
            "mean": float(np.mean(v)),
            "std": float(np.std(v, ddof=0)),
        }
        for (d, b, m, o, k, e), v in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))
    ]


def load_published() -> list[dict]:
    return json.loads(PUBLISHED.read_text())["numbers"]


def _published_index(published: list[dict]) -> dict[tuple, dict]:
    spec = {"RN50": "RN50", "RN101": "RN101", "ViT-B/32": "ViT-B/32", "ViT-B/16": "ViT-B/16"}
    return {
        (p["dataset"], spec.get(p["backbone"], p["backbone"]), p["method"], p["shots"], p.get("eval_dataset", "")): p
        for p in published
    }


def write_report(exp: str | Path, out: str | Path | None = None, compare_published: bool = False) -> dict:
    exp = Path(exp)
    out = Path(out) if out is not None else exp / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = collect(exp)
    rows = summarise(records)
    grid = json.loads((exp / "sweep.json").read_text()) if (exp / "sweep.json").is_file() else {}
    files = [_write_csv(rows, out / "results.csv")]
    published = _published_index(load_published()) if compare_published else {}
    md, summary = _markdown(rows, records, grid, published)
    (out / "results.md").write_text(md)
    files.append(out / "results.md")
    files += _plot_accuracy(rows, out / "accuracy_vs_shots")
    files += _plot_difficulty(records, out / "residual_vs_difficulty")
    return {"files": files, "summary": summary, "rows": rows}


def _write_csv(rows: list[dict], path: Path) -> Path:
    """One row per (dataset, backbone, method, shots[, eval dataset]); a column per grid option, named as it."""
    dg = any(r["eval_dataset"] for r in rows)
    option_names = [n for n, _ in rows[0]["options"]] if rows and rows[0].get("options") else []
    columns = ["dataset", "backbone", "method", *option_names, "shots", "n_seeds", "mean", "std"] + (
        ["eval_dataset"] if dg else []
    )
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            values = {**r, **dict(r.get("options") or ()), "method": r["method"].split(" (")[0]}
            writer.writerow([f"{values[c]:.4f}" if c in ("mean", "std") else values[c] for c in columns])
    return path


def _cell(row: dict | None, want_seeds: int, pub: dict | None) -> str:
    if row is None:
        return "—"
    text = f"{row['mean']:.2f}" if row["shots"] == 0 else f"{row['mean']:.2f} ± {row['std']:.2f}"
    if row["shots"] and row["n_seeds"] < want_seeds:
        text += f" (n={row['n_seeds']})"
    if pub is not None:
        text += f" [pub {pub['accuracy']:.2f}, {row['mean'] - pub['accuracy']:+.2f}]"
    return text


def _markdown(rows: list[dict], records: list[dict], grid: dict, published: dict) -> tuple[str, list[str]]:
    few = [r for r in rows if not r["eval_dataset"]]
    want_seeds = len(grid.get("seeds") or []) or max((r["n_seeds"] for r in few if r["shots"]), default=1)
    protocol = grid.get("protocol", "default")
    lines = [
        "# Results",
        "",
        f"Top-1 accuracy (%) on the full test splits, mean ± std over seeds (numpy std, ddof=0, "
        f"as CoOp's parse_test_res.py); a cell with fewer seeds than the grid's {want_seeds} says n=. Protocol: "
        f"**{protocol}** (selection on the few-shot validation split unless a run says test_selected).",
    ]
    if any(r.get("test_selected") for r in records):
        lines.append("Runs marked † selected on the test split (their public code's protocol).")
    if published:
        lines.append("[pub X, ±d]: a published number of the same protocol and our difference; sources at the end.")
    lines.append("")
    summary, used_sources, negative = [], set(), []
    selected = {(r["dataset"], r["backbone"], r["method"], r["shots"]) for r in records if r.get("test_selected")}
    for backbone in sorted({r["backbone"] for r in few}):
        shots = sorted({r["shots"] for r in few if r["backbone"] == backbone and r["shots"]})
        methods = sorted({r["method"] for r in few if r["backbone"] == backbone}, key=lambda m: (m != ZERO_SHOT, m))
        datasets = list(dict.fromkeys(r["dataset"] for r in few if r["backbone"] == backbone))
        index = {(r["dataset"], r["method"], r["shots"]): r for r in few if r["backbone"] == backbone}
        lines += [f"## {backbone}", ""]
        header = "| method | " + " | ".join(f"{k} shots" for k in shots) + " |"
        sep = "| --- |" + " --- |" * len(shots)
        for dataset in datasets + ["average"]:
            lines += [f"### {dataset}", "", header, sep]
            for m in methods:
                cells = []
                for k in shots:
                    kk = 0 if m == ZERO_SHOT else k
                    if dataset == "average":
                        parts = [index.get((d, m, kk)) for d in datasets]
                        complete = all(p is not None and (kk == 0 or p["n_seeds"] >= want_seeds) for p in parts)
                        cells.append(f"{np.mean([p['mean'] for p in parts if p is not None]):.2f}" if complete else "—")
                        continue
                    pub = published.get((dataset, backbone, m, kk, ""))
                    if pub is not None:
                        used_sources.add(pub["source"])
                    mark = " †" if (dataset, backbone, m, kk) in selected else ""
                    row, zs = index.get((dataset, m, kk)), index.get((dataset, ZERO_SHOT, 0))
                    if row is not None and zs is not None and kk and row["mean"] < zs["mean"]:
                        mark += " ↓"
                        negative.append(
                            f"{backbone} {dataset} {m} {kk} shots: {row['mean']:.2f} < zero-shot {zs['mean']:.2f}"
                        )
                    cells.append(_cell(row, want_seeds, pub) + mark)
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
            if dataset == "average":
                lines.append(
                    f"The average covers the {len(datasets)} datasets above; — where a dataset lacks the "
                    "cell or some of its seeds (never averaged over fewer)."
                )
                lines.append("")
                top = max(shots) if shots else 0
                for m in methods:
                    parts = [index.get((d, m, 0 if m == ZERO_SHOT else top)) for d in datasets]
                    if all(parts):
                        summary.append(
                            f"{backbone} {m} ({'zero-shot' if m == ZERO_SHOT else f'{top} shots'}), "
                            f"average over {len(datasets)} datasets: "
                            f"{np.mean([p['mean'] for p in parts if p is not None]):.2f}"
                        )
    dg = [r for r in rows if r["eval_dataset"]]
    if dg:
        lines += [
            "## Domain generalisation",
            "",
            "Trained on the source dataset, evaluated on each target (mean over "
            "seeds); the average is over the targets.",
            "",
        ]
        targets = sorted({r["eval_dataset"] for r in dg})
        lines += [
            "| backbone | method | source | " + " | ".join(targets) + " | target average |",
            "| --- | --- | --- |" + " --- |" * (len(targets) + 1),
        ]
        for backbone, method, source, k in sorted({(r["backbone"], r["method"], r["dataset"], r["shots"]) for r in dg}):
            src = next(
                (
                    r
                    for r in few
                    if (r["backbone"], r["method"], r["dataset"], r["shots"]) == (backbone, method, source, k)
                ),
                None,
            )
            vals = {
                r["eval_dataset"]: r["mean"]
                for r in dg
                if (r["backbone"], r["method"], r["dataset"], r["shots"]) == (backbone, method, source, k)
            }
            cells = [f"{vals[t]:.2f}" if t in vals else "—" for t in targets]
            avg = f"{np.mean(list(vals.values())):.2f}" if len(vals) == len(targets) else "—"
            lines.append(
                f"| {backbone} | {method} ({k} shots) | {src['mean']:.2f} | "
                if src
                else f"| {backbone} | {method} ({k} shots) | — | "
            )
            lines[-1] += " | ".join(cells) + f" | {avg} |"
        lines.append("")
    if negative:
        lines += (
            [
                "## Negative transfer",
                "",
                "Cells marked ↓ are below the zero-shot accuracy of the same dataset and backbone:",
                "",
            ]
            + [f"- {n}" for n in negative]
            + [""]
        )
    corr = correlations(records)
    if corr:
        lines += [
            "## Residual magnitude against transfer difficulty (Fig. 4)",
            "",
            "Difficulty = (1 / C) / zero-shot accuracy; residual = mean |x| at the largest shot count, averaged "
            "over seeds; correlations over datasets (scipy.stats).",
            "",
        ]
    for c in corr:
        lines += [
            f"- {c['label']}: over {c['n']} datasets, Pearson r = {c['pearson']:.3f} (p = {c['pearson_p']:.3g}), "
            f"Spearman rho = {c['spearman']:.3f} (p = {c['spearman_p']:.3g}), at {c['shots']} shots"
        ]
        summary.append(
            f"Fig. 4 {c['label']}: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f} ({c['n']} datasets)"
        )
    if corr:
        lines.append("")
    if used_sources:
        lines += ["## Sources of the published numbers", ""] + [f"- {s}" for s in sorted(used_sources)] + [""]
    return "\n".join(lines), summary


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _plot_accuracy(rows: list[dict], stem: Path) -> list[Path]:
    few = [r for r in rows if not r["eval_dataset"]]
    backbone = sorted({r["backbone"] for r in few})[0]
    few = [r for r in few if r["backbone"] == backbone]
    datasets = list(dict.fromkeys(r["dataset"] for r in few)) + ["average"]
    methods = sorted({r["method"] for r in few if r["method"] != ZERO_SHOT})
    cols = min(4, len(datasets))
    nrows = -(-len(datasets) // cols)
    fig = _figure(4 * cols, 3.2 * nrows)
    index = {(r["dataset"], r["method"], r["shots"]): r for r in few}
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for j, m in enumerate(methods):
            ks = sorted({r["shots"] for r in few if r["method"] == m})
            pts: list[tuple[Any, Any, Any]]
            if dataset == "average":
                groups = [(k, [index.get((d, m, k)) for d in datasets[:-1]]) for k in ks]
                pts = [(k, np.mean([p["mean"] for p in ps if p is not None]), 0.0) for k, ps in groups if all(ps)]
            else:
                pts = [
                    (k, index[(dataset, m, k)]["mean"], index[(dataset, m, k)]["std"])
                    for k in ks
                    if (dataset, m, k) in index
                ]
            if not pts:
                continue
            k, mean, std = (np.array(v, dtype=float) for v in zip(*pts))
            ax.plot(k, mean, marker="o", color=f"C{j}", label=m)
            ax.fill_between(k, mean - std, mean + std, color=f"C{j}", alpha=0.2)
        zs = [index.get((d, ZERO_SHOT, 0)) for d in (datasets[:-1] if dataset == "average" else [dataset])]
        if all(zs):
            ax.axhline(
                np.mean([z["mean"] for z in zs if z is not None]),
                color="gray",
                linestyle="--",
                linewidth=1,
                label="zero-shot",
            )
        ax.set_xscale("log", base=2)
        ax.set_title(dataset)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, stem)


def difficulty_points(records: list[dict]) -> dict[tuple[str, str], list[tuple[str, float, float]]]:
    """Fig. 4 points per (backbone, TaskRes label): (dataset, relative transfer difficulty (1/C) / zero-shot
    accuracy, mean |residual| over seeds) at the largest shot count of that label."""
    tr = [
        r
        for r in records
        if r["method"].split(" (")[0] == "taskres"
        and not r["eval_dataset"]
        and r.get("residual_mean_abs") is not None
        and r.get("zero_shot_accuracy")
    ]
    out: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for key in sorted({(r["backbone"], r["method"]) for r in tr}):
        mine = [r for r in tr if (r["backbone"], r["method"]) == key]
        top = max(r["shots"] for r in mine)
        by_dataset: dict[str, list[dict]] = defaultdict(list)
        for r in mine:
            if r["shots"] == top:
                by_dataset[r["dataset"]].append(r)
        out[key] = [
            (
                d,
                (1.0 / rs[0]["num_classes"]) / max(rs[0]["zero_shot_accuracy"] / 100.0, 1e-6),
                float(np.mean([r["residual_mean_abs"] for r in rs])),
            )
            for d, rs in sorted(by_dataset.items())
        ]
    return out


def correlations(records: list[dict]) -> list[dict]:
    """Pearson and Spearman correlation of the Fig. 4 points (scipy.stats), for each set of three or more datasets."""
    from scipy.stats import pearsonr, spearmanr

    out = []
    for (backbone, label), points in difficulty_points(records).items():
        if len(points) < 3:
            continue
        x, y = [p[1] for p in points], [p[2] for p in points]
        pr, sr = pearsonr(x, y), spearmanr(x, y)
        shots = max(r["shots"] for r in records if r["method"] == label)
        out.append(
            {
                "label": f"{backbone} {label}",
                "n": len(points),
                "pearson": float(pr.statistic),
                "pearson_p": float(pr.pvalue),
                "spearman": float(sr.statistic),
                "spearman_p": float(sr.pvalue),
                "shots": shots,
            }
        )
    return out


def _plot_difficulty(records: list[dict], stem: Path) -> list[Path]:
    """Fig. 4: mean |residual| of TaskRes at the largest shot count against (1/C) / zero-shot accuracy."""
    sets = difficulty_points(records)
    if not sets:
        return []
    stats = {c["label"]: c for c in correlations(records)}
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    for j, ((backbone, label), points) in enumerate(sets.items()):
        c = stats.get(f"{backbone} {label}")
        legend = f"{backbone} {label}" + (f": r={c['pearson']:.2f}, rho={c['spearman']:.2f}, n={c['n']}" if c else "")
        ax.scatter([p[1] for p in points], [p[2] for p in points], color=f"C{j % 10}", label=legend)
        if j == 0:
            for d, x, y in points:
                ax.annotate(d, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("relative transfer difficulty = (1 / C) / zero-shot accuracy")
    ax.set_ylabel("mean |residual| at the largest shot count")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, stem)


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=110)
    fig.savefig(paths[1])
    return paths
