"""EXP/report/index.html: one self-contained page per experiment (inline style, script and SVG figures; opens from
disk with no network): what was run, the tables, the figures and a per-dataset drill-down by class.

Every number comes from the rows of :func:`taskres.app.report.summary.summarise` that results.csv writes (each
table cell carries that row's values in ``data-*`` attributes, as results.csv prints them) and from the records
of :func:`taskres.app.report.records.collect`. Every name from the experiment is escaped.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

import taskres
from taskres.app.report.drilldown import class_sections
from taskres.app.report.figures import accuracy_figure, difficulty_figure, svg_text
from taskres.app.report.page_assets import CSS, JS, esc
from taskres.app.report.records import ZERO_SHOT, readable
from taskres.app.report.summary import correlations
from taskres.app.report.tables import wanted_seeds
from taskres.atomic import write_text


@dataclass
class Page:
    """What the page is built from; ``sources`` collects the published numbers' sources on the way."""

    exp: Path
    out: Path
    rows: list[dict]
    records: list[dict]
    grid: dict
    published: dict
    failures: list[dict]
    imported: list[dict]
    sources: set[str] = field(default_factory=set)

    def link(self, run: str, name: str, text: str, title: str = "") -> str:
        """A relative link from the page to ``name`` in a run folder."""
        rel = os.path.relpath(Path(run).resolve() / name, self.out.resolve())
        tip = f' title="{esc(title)}"' if title else ""
        return f'<a href="{esc(quote(os.fsencode(Path(rel).as_posix())))}"{tip}>{esc(text)}</a>'


def write_page(page: Page) -> Path:
    """Write ``page.out/index.html``."""
    path = page.out / "index.html"
    # a browser reads UTF-8: a name from a folder that is not UTF-8 shows U+FFFD (its links keep the bytes)
    write_text(path, readable(render(page)))
    return path


def render(page: Page) -> str:
    name = page.exp.resolve().name
    sections = [_run_section(page), _tables_section(page), _figures_section(page), class_sections(page)]
    nav = "".join(
        f'<a href="#{a}">{t}</a>' for a, t in (("run", "What was run"), ("tables", "Tables"), ("figures", "Figures"))
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(name)}: taskres report</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{esc(name)}</h1><p>taskres report of <code>{esc(page.exp)}</code>: "
        f"{sum(not r['eval_dataset'] for r in page.records)} runs; written by taskres {esc(taskres.__version__)} "
        f"on {time.strftime('%Y-%m-%d %H:%M')}.</p></header>"
        f'<nav>{nav}<a href="#classes">Per class</a></nav>' + "".join(sections) + f"</main><script>{JS}</script>"
        "</body></html>\n"
    )


def _run_section(page: Page) -> str:
    """Datasets, backbones (weights hash), methods and their settings, shots, seeds, protocol, views, versions, wall
    time; then the failed cells and the imported runs."""
    runs = [r for r in page.records if not r["eval_dataset"]]
    trained = [r for r in runs if r["shots"]]
    classes = {r["dataset"]: r.get("num_classes") for r in runs}
    hashes = {r["backbone"]: r.get("backbone_sha256") for r in runs}
    timed = [r["seconds"] for r in runs if r.get("seconds") is not None]
    facts = [
        ("datasets", ", ".join(f"{esc(d)} ({esc(c)} classes)" for d, c in classes.items())),
        ("backbones", ", ".join(f"{esc(b)} <code>sha256 {esc(h or 'not recorded')}</code>" for b, h in hashes.items())),
        ("shots", ", ".join(str(k) for k in sorted({r["shots"] for r in trained})) or "zero-shot only"),
        ("seeds", ", ".join(str(s) for s in sorted({r["seed"] for r in trained})) or "—"),
        ("protocol", esc(", ".join(sorted({r["protocol"] for r in runs})))),
        ("views", esc(", ".join(sorted({str(r.get("views")) for r in trained})) or "—")),
        ("taskres", esc(", ".join(sorted({str(r.get("taskres_version")) for r in runs})))),
        ("torch", esc(", ".join(sorted({str(r.get("torch_version")) for r in runs})))),
        ("wall time", f"{sum(timed):.0f} s of features and training over {len(timed)} of {len(runs)} runs"),
    ]
    out = ['<section id="run"><h2>What was run</h2><dl class="facts">']
    out += [f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts]
    out.append("</dl>" + _methods_table(trained) + _failures_table(page.failures) + _imported_table(page))
    return "".join(out) + "</section>"


def _methods_table(trained: list[dict]) -> str:
    first: dict[str, dict] = {}
    for r in trained:
        first.setdefault(r["method"], r)
    if not first:
        return ""
    rows = []
    for m, r in first.items():
        mc = ", ".join(f"{k}={v}" for k, v in (r.get("method_config") or {}).items() if v is not None)
        o = r.get("optim") or {}
        optim = ", ".join(f"{k}={o[k]}" for k in ("lr", "epochs", "batch_size", "weight_decay") if k in o)
        rows.append(f'<tr><td>{esc(m)}</td><td class="text">{esc(mc)}</td><td class="text">{esc(optim)}</td></tr>')
    head = '<tr><th>method</th><th class="text">settings</th><th class="text">optimiser (first run)</th></tr>'
    return f"<h3>Methods</h3><table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _failures_table(failures: list[dict]) -> str:
    if not failures:
        return '<p class="note">No failed cells (EXP/failures.jsonl).</p>'
    rows = "".join(
        f'<tr><td>{esc(f["cell"])}</td><td class="text error">{esc(f.get("error", ""))}</td>'
        f"<td>{esc(f.get('time', ''))}</td></tr>"
        for f in failures
    )
    return (
        f"<h3>Failed cells ({len(failures)})</h3><p class='note'>From EXP/failures.jsonl, without a finished run "
        "folder; their cells are missing from the tables (— or n=).</p>"
        f"<table><thead><tr><th>cell</th><th>error</th><th>time</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _imported_table(page: Page) -> str:
    if not page.imported:
        return ""
    rows = "".join(
        f"<tr><td>{esc(r['dataset'])}</td><td>{esc(r['backbone'])}</td><td>{r['accuracy']:.2f}</td>"
        f'<td class="text"><code>{esc(r["checkpoint"])}</code></td>'
        f"<td>{page.link(r['run'], 'metrics.json', 'metrics')} {page.link(r['run'], 'config.json', 'config')}</td></tr>"
        for r in page.imported
    )
    return (
        "<h3>Imported official checkpoints</h3><p class='note'>Evaluated by <code>taskres import</code>; outside the "
        "grid (no shots or seed), so not in the tables.</p><table><thead><tr><th>dataset</th><th>backbone</th>"
        f"<th>accuracy</th><th>checkpoint</th><th>run</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _tables_section(page: Page) -> str:
    few = [r for r in page.rows if not r["eval_dataset"]]
    want = wanted_seeds(page.rows, page.grid)
    runs: dict[tuple, list[dict]] = defaultdict(list)
    for r in sorted(page.records, key=lambda r: r["seed"] or 0):
        runs[(r["dataset"], r["backbone"], r["method"], r["shots"], r["eval_dataset"])].append(r)
    out = [
        '<section id="tables"><h2>Tables</h2><p class="note">Top-1 accuracy (%) on the test split, mean ± std over '
        f"seeds (numpy std, ddof=0); the grid has {want} seed(s) per cell, <i>n=</i> where a cell has fewer, "
        "<i>one seed</i> where there is no spread to show. ↓ (red): below zero-shot (negative transfer); †: selected "
        "on the test split. Click a column to sort; under a number, its runs' metrics.json (s1: seed 1) and "
        "config.json (cfg).</p>"
    ]
    for backbone in sorted({r["backbone"] for r in few}):
        out.append(_backbone_tables(page, [r for r in few if r["backbone"] == backbone], runs, want))
    out.append(_dg_table(page, runs))
    if page.sources:
        out.append("<h3>Sources of the published numbers</h3><ul>")
        out += [f"<li>{esc(s)}</li>" for s in sorted(page.sources)] + ["</ul>"]
    return "".join(out) + "</section>"


def _backbone_tables(page: Page, mine: list[dict], runs: dict, want: int) -> str:
    backbone = mine[0]["backbone"]
    shots = sorted({r["shots"] for r in mine if r["shots"]}) or [0]
    methods = sorted({r["method"] for r in mine}, key=lambda m: (m != ZERO_SHOT, m))
    index = {(r["dataset"], r["method"], r["shots"]): r for r in mine}
    datasets = list(dict.fromkeys(r["dataset"] for r in mine))
    head = "<tr><th>method</th>" + "".join(f"<th>{k} shot{'s' if k != 1 else ''}</th>" for k in shots) + "</tr>"
    out = [f"<h3>{esc(backbone)}</h3><div class='grid2'>"]
    for d in datasets:
        body = []
        for m in methods:
            cells = []
            for k in shots:
                kk = 0 if m == ZERO_SHOT else k
                cells.append(_cell(page, index.get((d, m, kk)), index.get((d, ZERO_SHOT, 0)), runs, want))
            body.append(f"<tr><td>{esc(m)}</td>{''.join(cells)}</tr>")
        out.append(f"<div><h3>{esc(d)}</h3>{_table(head, body)}</div>")
    average = _average_table(index, datasets, methods, shots, want, head)
    out.append(f"<div><h3>average over {len(datasets)} datasets</h3>{average}</div>")
    return "".join(out) + "</div>"


def _table(head: str, body: list[str]) -> str:
    return f'<table class="sortable"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _cell(page: Page, row: dict | None, zero: dict | None, runs: dict, want: int) -> str:
    """A table cell: the row's mean ± std (as results.csv has it in data-*), its marks, the published number and
    the links to its runs."""
    if row is None:
        return '<td class="missing" data-sort="">—</td>'
    key = (row["dataset"], row["backbone"], row["method"], row["shots"], row["eval_dataset"])
    text = f"{row['mean']:.2f}"
    if row["shots"] and row["n_seeds"] == 1:
        text += ' <span class="s">one seed</span>'
    elif row["shots"]:
        text += f' <span class="s">± {row["std"]:.2f}</span>'
    if row["shots"] and 1 < row["n_seeds"] < want:
        text += f' <span class="s">n={row["n_seeds"]}</span>'
    selected = any(r.get("test_selected") for r in runs.get(key, []))
    negative = zero is not None and row["shots"] and row["mean"] < zero["mean"]
    text += (" †" if selected else "") + (" ↓" if negative else "")
    pub = page.published.get((row["dataset"], row["backbone"], row["method"], row["shots"], row["eval_dataset"]))
    if pub is not None:
        page.sources.add(pub["source"])
        text += f'<span class="pub">pub {pub["accuracy"]:.2f} ({row["mean"] - pub["accuracy"]:+.2f})</span>'
    attrs = " ".join(
        f'data-{k}="{esc(v)}"'
        for k, v in (
            ("dataset", row["dataset"]),
            ("backbone", row["backbone"]),
            ("method", row["method"].split(" (")[0]),
            ("shots", row["shots"]),
            ("eval", row["eval_dataset"]),
            ("n", row["n_seeds"]),
            ("mean", f"{row['mean']:.4f}"),
            ("std", f"{row['std']:.4f}"),
        )
    )
    links = _links(page, runs.get(key, []))
    return f'<td class="cell{" neg" if negative else ""}" data-sort="{row["mean"]:.4f}" {attrs}>{text}{links}</td>'


def _links(page: Page, runs: list[dict]) -> str:
    if not runs:
        return ""
    seeds = " ".join(
        page.link(r["run"], "metrics.json", f"s{r['seed']}" if r["seed"] is not None else "metrics", "metrics.json")
        for r in runs
    )
    return f'<span class="runs">{seeds} {page.link(runs[0]["run"], "config.json", "cfg", "config.json")}</span>'


def _average_table(index: dict, datasets: list[str], methods: list[str], shots: list[int], want: int, head: str) -> str:
    """The mean over datasets, only where every dataset has the cell with all its seeds (as results.md)."""
    body = []
    for m in methods:
        cells = []
        for k in shots:
            parts = [index.get((d, m, 0 if m == ZERO_SHOT else k)) for d in datasets]
            if all(p is not None and (m == ZERO_SHOT or p["n_seeds"] >= want) for p in parts):
                mean = float(np.mean([p["mean"] for p in parts if p is not None]))
                cells.append(f'<td data-sort="{mean:.4f}">{mean:.2f}</td>')
            else:
                cells.append('<td class="missing" data-sort="">—</td>')
        body.append(f"<tr><td>{esc(m)}</td>{''.join(cells)}</tr>")
    return _table(head, body)


def _dg_table(page: Page, runs: dict) -> str:
    dg = [r for r in page.rows if r["eval_dataset"]]
    if not dg:
        return ""
    targets = sorted({r["eval_dataset"] for r in dg})
    index = {(r["backbone"], r["method"], r["dataset"], r["shots"], r["eval_dataset"]): r for r in page.rows}
    head = "<tr><th>backbone</th><th>method</th><th>source</th>" + "".join(f"<th>{esc(t)}</th>" for t in targets)
    body = []
    for b, m, d, k in sorted({(r["backbone"], r["method"], r["dataset"], r["shots"]) for r in dg}):
        cells = [_cell(page, index.get((b, m, d, k, t)), None, runs, 0) for t in targets]
        source = _cell(page, index.get((b, m, d, k, "")), None, runs, 0)
        body.append(f"<tr><td>{esc(b)}</td><td class='text'>{esc(m)} ({k} shots)</td>{source}{''.join(cells)}</tr>")
    return (
        "<h3>Domain generalisation</h3><p class='note'>Trained on the source dataset, evaluated on each target.</p>"
        + _table(head + "</tr>", body)
    )


def _figures_section(page: Page) -> str:
    few = [r for r in page.rows if not r["eval_dataset"]]
    out = ['<section id="figures"><h2>Figures</h2>']
    if few:
        out.append("<h3>Accuracy against shots (Fig. 3; first backbone, ± std bands)</h3>")
        out.append(f'<div class="figure">{svg_text(accuracy_figure(page.rows))}</div>')
    fig = difficulty_figure(page.records)
    if fig is not None:
        out.append("<h3>Residual magnitude against transfer difficulty (Fig. 4)</h3>")
        out.append(f'<div class="figure">{svg_text(fig)}</div><ul>')
        out += [
            f"<li>{esc(c['label'])}: over {c['n']} datasets at {c['shots']} shots, Pearson r = {c['pearson']:.3f} "
            f"(p = {c['pearson_p']:.3g}), Spearman ρ = {c['spearman']:.3f} (p = {c['spearman_p']:.3g})</li>"
            for c in correlations(page.records)
        ]
        out.append("</ul>")
    return "".join(out) + "</section>"
