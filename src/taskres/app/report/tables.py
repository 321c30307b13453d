"""The tables: results.csv, results.md (methods x shots per dataset, the average, the DG table, negative transfer,
the Fig. 4 correlations, the published numbers' sources) and the demo's console table. Every mean and ± comes from
the rows of :func:`taskres.app.report.summary.summarise`."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from taskres.app.report.records import ZERO_SHOT
from taskres.app.report.summary import correlations
from taskres.atomic import write_text

PUBLISHED = Path(__file__).resolve().parents[2] / "assets" / "published.json"


def load_published() -> list[dict]:
    return json.loads(PUBLISHED.read_text())["numbers"]


def published_index(published: list[dict]) -> dict[tuple, dict]:
    """(dataset, backbone, method, shots, eval_dataset) -> the published number."""
    spec = {"RN50": "RN50", "RN101": "RN101", "ViT-B/32": "ViT-B/32", "ViT-B/16": "ViT-B/16"}
    return {
        (p["dataset"], spec.get(p["backbone"], p["backbone"]), p["method"], p["shots"], p.get("eval_dataset", "")): p
        for p in published
    }


def write_csv(rows: list[dict], path: Path) -> Path:
    """One row per (dataset, backbone, method, shots[, eval dataset]); a column per grid option, named as it."""
    dg = any(r["eval_dataset"] for r in rows)
    option_names = [n for n, _ in rows[0]["options"]] if rows and rows[0].get("options") else []
    columns = ["dataset", "backbone", "method", *option_names, "shots", "n_seeds", "mean", "std"] + (
        ["eval_dataset"] if dg else []
    )
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(columns)
    for r in rows:
        values = {**r, **dict(r.get("options") or ()), "method": r["method"].split(" (")[0]}
        writer.writerow([f"{values[c]:.4f}" if c in ("mean", "std") else values[c] for c in columns])
    write_text(path, text.getvalue())
    return path


def console_table(rows: list[dict], datasets: list[str], shots: tuple[int, ...], method: str = "taskres") -> str:
    """The demo's table: one line per dataset, zero-shot, then ``method`` at each shot count (mean +- std over
    seeds) and the gain at the largest shot count."""
    index = {(r["dataset"], r["method"], r["shots"]): r for r in rows if not r["eval_dataset"]}
    missing = {"mean": float("nan"), "std": 0.0, "n_seeds": 0}
    head = f"{'task':<18}{'zero-shot':>10}" + "".join(f"{f'{k}-shot':>14}" for k in shots) + f"{'gain':>8}"
    lines = [head, "-" * len(head)]
    for d in datasets:
        zs = index.get((d, ZERO_SHOT, 0), missing)["mean"]
        cells = []
        for k in shots:
            r = index.get((d, method, k), missing)
            cells.append(f"{r['mean']:6.1f} +-{r['std']:4.1f}" if r["n_seeds"] > 1 else f"{r['mean']:10.1f}    ")
        top = index.get((d, method, max(shots)), missing)["mean"]
        lines.append(f"{d:<18}{zs:>10.1f}" + "".join(f"{c:>14}" for c in cells) + f"{top - zs:>+8.1f}")
    return "\n".join(lines)


@dataclass
class _Context:
    """What every cell of results.md needs (the seeds a cell should have, the published numbers, the runs that
    selected on the test split) and what the cells collect on the way (the summary lines, the sources cited, the
    cells below zero-shot)."""

    want_seeds: int
    published: dict
    selected: set
    summary: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)
    negative: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Panel:
    """One backbone's few-shot rows, indexed by (dataset, method, shots)."""

    backbone: str
    shots: list[int]
    methods: list[str]
    datasets: list[str]
    index: dict[tuple, dict]


def wanted_seeds(rows: list[dict], grid: dict) -> int:
    """The seeds a trained cell should have: the grid's (EXP/sweep.json), else the most any cell has."""
    few = [r for r in rows if not r["eval_dataset"] and r["shots"]]
    return len(grid.get("seeds") or []) or max((r["n_seeds"] for r in few), default=1)


def markdown(rows: list[dict], records: list[dict], grid: dict, published: dict) -> tuple[str, list[str]]:
    """results.md and the summary lines `taskres report` prints."""
    few = [r for r in rows if not r["eval_dataset"]]
    want_seeds = wanted_seeds(rows, grid)
    lines = _preamble(grid.get("protocol", "default"), want_seeds, records, published)
    selected = {(r["dataset"], r["backbone"], r["method"], r["shots"]) for r in records if r.get("test_selected")}
    ctx = _Context(want_seeds, published, selected)
    for backbone in sorted({r["backbone"] for r in few}):
        lines += _backbone_section(_panel(few, backbone), ctx)
    lines += _dg_section(rows, few)
    lines += _negative_section(ctx.negative)
    lines += _correlation_section(records, ctx.summary)
    if ctx.sources:
        lines += ["## Sources of the published numbers", ""] + [f"- {s}" for s in sorted(ctx.sources)] + [""]
    return "\n".join(lines), ctx.summary


def _preamble(protocol: str, want_seeds: int, records: list[dict], published: dict) -> list[str]:
    lines = [
        "# Results",
        "",
        f"Top-1 accuracy (%) on the full test splits, mean ± std over seeds (numpy std, ddof=0, "
        f"as CoOp's parse_test_res.py; none for a single seed); a cell with fewer seeds than the grid's {want_seeds} "
        "says n=. Protocol: "
        f"**{protocol}** (selection on the few-shot validation split unless a run says test_selected).",
    ]
    if any(r.get("test_selected") for r in records):
        lines.append("Runs marked † selected on the test split (their public code's protocol).")
    if published:
        lines.append("[pub X, ±d]: a published number of the same protocol and our difference; sources at the end.")
    return lines + [""]


def _panel(few: list[dict], backbone: str) -> _Panel:
    mine = [r for r in few if r["backbone"] == backbone]
    return _Panel(
        backbone,
        shots=sorted({r["shots"] for r in mine if r["shots"]}),
        methods=sorted({r["method"] for r in mine}, key=lambda m: (m != ZERO_SHOT, m)),
        datasets=list(dict.fromkeys(r["dataset"] for r in mine)),
        index={(r["dataset"], r["method"], r["shots"]): r for r in mine},
    )


def _backbone_section(p: _Panel, ctx: _Context) -> list[str]:
    """One table per dataset and one of their average."""
    lines = [f"## {p.backbone}", ""]
    header = ["| method | " + " | ".join(f"{k} shots" for k in p.shots) + " |", "| --- |" + " --- |" * len(p.shots)]
    for dataset in p.datasets:
        lines += [f"### {dataset}", "", *header]
        for m in p.methods:
            cells = [_dataset_cell(p, dataset, m, k, ctx) for k in p.shots]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### average", "", *header]
    for m in p.methods:
        lines.append(f"| {m} | " + " | ".join(_average_cell(p, m, k, ctx.want_seeds) for k in p.shots) + " |")
    lines += [
        "",
        f"The average covers the {len(p.datasets)} datasets above; — where a dataset lacks the "
        "cell or some of its seeds (never averaged over fewer).",
        "",
    ]
    ctx.summary += _average_summary(p)
    return lines


def _dataset_cell(p: _Panel, dataset: str, m: str, k: int, ctx: _Context) -> str:
    """The cell's mean ± std, marked † (selected on the test split) and ↓ (below zero-shot, noted in ctx)."""
    kk = 0 if m == ZERO_SHOT else k
    pub = ctx.published.get((dataset, p.backbone, m, kk, ""))
    if pub is not None:
        ctx.sources.add(pub["source"])
    mark = " †" if (dataset, p.backbone, m, kk) in ctx.selected else ""
    row, zs = p.index.get((dataset, m, kk)), p.index.get((dataset, ZERO_SHOT, 0))
    if row is not None and zs is not None and kk and row["mean"] < zs["mean"]:
        mark += " ↓"
        ctx.negative.append(f"{p.backbone} {dataset} {m} {kk} shots: {row['mean']:.2f} < zero-shot {zs['mean']:.2f}")
    return _cell(row, ctx.want_seeds, pub) + mark


def _cell(row: dict | None, want_seeds: int, pub: dict | None) -> str:
    if row is None:
        return "—"
    one = row["shots"] == 0 or row["n_seeds"] < 2  # no spread to show: zero-shot, or a single seed
    text = f"{row['mean']:.2f}" if one else f"{row['mean']:.2f} ± {row['std']:.2f}"
    if row["shots"] and row["n_seeds"] < want_seeds:
        text += f" (n={row['n_seeds']})"
    if pub is not None:
        text += f" [pub {pub['accuracy']:.2f}, {row['mean'] - pub['accuracy']:+.2f}]"
    return text


def _average_cell(p: _Panel, m: str, k: int, want_seeds: int) -> str:
    """The mean over datasets, only where every dataset has the cell with all its seeds."""
    kk = 0 if m == ZERO_SHOT else k
    parts = [p.index.get((d, m, kk)) for d in p.datasets]
    complete = all(r is not None and (kk == 0 or r["n_seeds"] >= want_seeds) for r in parts)
    return f"{np.mean([r['mean'] for r in parts if r is not None]):.2f}" if complete else "—"


def _average_summary(p: _Panel) -> list[str]:
    top = max(p.shots) if p.shots else 0
    out = []
    for m in p.methods:
        parts = [p.index.get((d, m, 0 if m == ZERO_SHOT else top)) for d in p.datasets]
        if all(parts):
            out.append(
                f"{p.backbone} {m} ({'zero-shot' if m == ZERO_SHOT else f'{top} shots'}), "
                f"average over {len(p.datasets)} datasets: "
                f"{np.mean([r['mean'] for r in parts if r is not None]):.2f}"
            )
    return out


def _dg_section(rows: list[dict], few: list[dict]) -> list[str]:
    """Domain generalisation: each trained cell's source accuracy and its accuracy on every target."""
    dg = [r for r in rows if r["eval_dataset"]]
    if not dg:
        return []
    targets = sorted({r["eval_dataset"] for r in dg})
    lines = [
        "## Domain generalisation",
        "",
        "Trained on the source dataset, evaluated on each target (mean over seeds); the average is over the targets.",
        "",
        "| backbone | method | source | " + " | ".join(targets) + " | target average |",
        "| --- | --- | --- |" + " --- |" * (len(targets) + 1),
    ]
    source = {(r["backbone"], r["method"], r["dataset"], r["shots"]): r for r in reversed(few)}
    for key in sorted({(r["backbone"], r["method"], r["dataset"], r["shots"]) for r in dg}):
        backbone, method, _, k = key
        vals = {
            r["eval_dataset"]: r["mean"] for r in dg if (r["backbone"], r["method"], r["dataset"], r["shots"]) == key
        }
        cells = [f"{vals[t]:.2f}" if t in vals else "—" for t in targets]
        avg = f"{np.mean(list(vals.values())):.2f}" if len(vals) == len(targets) else "—"
        src = source.get(key)
        lines.append(
            f"| {backbone} | {method} ({k} shots) | {src['mean']:.2f} | "
            if src
            else f"| {backbone} | {method} ({k} shots) | — | "
        )
        lines[-1] += " | ".join(cells) + f" | {avg} |"
    return lines + [""]


def _negative_section(negative: list[str]) -> list[str]:
    if not negative:
        return []
    return [
        "## Negative transfer",
        "",
        "Cells marked ↓ are below the zero-shot accuracy of the same dataset and backbone:",
        "",
        *[f"- {n}" for n in negative],
        "",
    ]


def _correlation_section(records: list[dict], summary: list[str]) -> list[str]:
    corr = correlations(records)
    if not corr:
        return []
    lines = [
        "## Residual magnitude against transfer difficulty (Fig. 4)",
        "",
        "Difficulty = (1 / C) / zero-shot accuracy; residual = mean |x| at the largest shot count, averaged "
        "over seeds; correlations over datasets (scipy.stats).",
        "",
    ]
    for c in corr:
        lines.append(
            f"- {c['label']}: over {c['n']} datasets, Pearson r = {c['pearson']:.3f} (p = {c['pearson_p']:.3g}), "
            f"Spearman rho = {c['spearman']:.3f} (p = {c['spearman_p']:.3g}), at {c['shots']} shots"
        )
        summary.append(
            f"Fig. 4 {c['label']}: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f} ({c['n']} datasets)"
        )
    return lines + [""]
