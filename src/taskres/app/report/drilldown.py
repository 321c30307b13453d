"""The HTML page's drill-down: per dataset, each method's per-class accuracy against zero-shot at the largest shot
count (mean over seeds), sorted by the change, and the confusions of one run per method.

A large dataset shows its SHOWN most improved and SHOWN most hurt classes, the others behind "show all" and a search
box; its confusions as the most frequent pairs. Runs from a taskres that did not record per-class accuracy or
confusions say so instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from taskres.app.report.page_assets import esc
from taskres.app.report.records import ZERO_SHOT

if TYPE_CHECKING:
    from taskres.app.report.page import Page

SHOWN = 15  # classes shown at each end of a large dataset's table
MATRIX_MAX = 15  # the largest dataset whose confusion matrix is drawn whole


def class_sections(page: Page) -> str:
    runs = [r for r in page.records if not r["eval_dataset"]]
    out = [
        '<section id="classes"><h2>Per class</h2><p class="note">Per-class test accuracy (%) of each method at the '
        "largest shot count (mean over seeds) against zero-shot, sorted by the change (Δ) of the first method: the "
        "classes where tuning helped most come first, those where it hurt last. Click a column to sort.</p>"
    ]
    pairs = list(dict.fromkeys((r["backbone"], r["dataset"]) for r in runs))
    out.append('<div class="grid2">')
    for i, (backbone, dataset) in enumerate(pairs):
        mine = [r for r in runs if (r["backbone"], r["dataset"]) == (backbone, dataset)]
        out.append(f"<div>{_dataset_section(page, mine, f'classes-{i}')}</div>")
    return "".join(out) + "</div></section>"


def _dataset_section(page: Page, mine: list[dict], table_id: str) -> str:
    top = max(r["shots"] for r in mine)
    zero = sorted((r for r in mine if r["method"] == ZERO_SHOT), key=lambda r: r["run"])
    tuned: dict[str, list[dict]] = {}
    for r in sorted(mine, key=lambda r: (r["method"], r["seed"] or 0)):
        if r["method"] != ZERO_SHOT and r["shots"] == top:
            tuned.setdefault(r["method"], []).append(r)
    title = f"<h3>{esc(mine[0]['dataset'])} <small>({esc(mine[0]['backbone'])}, {top} shots)</small></h3>"
    if not zero:
        return title + '<p class="note">No zero-shot run of this dataset to compare with.</p>'
    runs = [zero[0]] + [r for rs in tuned.values() for r in rs]
    sizes = {len(r["per_class"]) if r.get("per_class") else None for r in runs}
    if None in sizes:
        return title + (
            '<p class="note">Per-class accuracy is missing from some of these runs (written by an older taskres, '
            "before metrics.json recorded it); rerun them to see this view.</p>"
        )
    if len(sizes) > 1:
        return title + '<p class="note">These runs disagree on the number of classes; per-class view skipped.</p>'
    table = _class_table(zero[0]["per_class"], tuned, table_id)
    confusions = "".join(_confusions(page, r) for r in [zero[0]] + [rs[0] for rs in tuned.values()])
    return title + table + confusions


def _class_table(zero: list[dict], tuned: dict[str, list[dict]], table_id: str) -> str:
    """One row per class: zero-shot accuracy, then each method's mean over seeds and its change."""
    base = [p["accuracy"] for p in zero]
    means = {
        m: [_mean([r["per_class"][c]["accuracy"] for r in rs]) for c in range(len(zero))] for m, rs in tuned.items()
    }
    deltas = {m: [None if a is None or b is None else a - b for a, b in zip(v, base)] for m, v in means.items()}
    first = next(iter(deltas.values()), [None] * len(zero))
    order = sorted(range(len(zero)), key=lambda c: (first[c] is None, -(first[c] or 0.0), c))
    fold = len(zero) > 2 * SHOWN + 10
    head = "<tr><th>class</th><th>label</th><th>test images</th><th>zero-shot</th>" + "".join(
        f"<th>{esc(m)}</th><th>Δ {esc(m)}</th>" for m in tuned
    )
    body = []
    for rank, c in enumerate(order):
        mid = fold and SHOWN <= rank < len(order) - SHOWN
        cells = [_number(base[c])]
        for m in tuned:
            cells += [_number(means[m][c]), _number(deltas[m][c], change=True)]
        fold_class = ' class="mid folded"' if mid else ""
        body.append(
            f'<tr data-name="{esc(str(zero[c]["class"]).lower())}"{fold_class}>'
            f"<td>{esc(zero[c]['class'])}</td><td>{int(zero[c]['label'])}</td><td>{int(zero[c]['n'])}</td>{''.join(cells)}</tr>"
        )
    show_all = (
        f'<label><input type="checkbox"> show all {len(zero)} classes</label> <span class="s">(shown: the {SHOWN} '
        f"most improved and the {SHOWN} most hurt; the search looks through all)</span>"
        if fold
        else ""
    )
    controls = (
        f'<div class="controls" data-table="{table_id}"><input type="search" placeholder="search {len(zero)} '
        f'classes" aria-label="search classes"> {show_all}</div>'
    )
    return (
        f'{controls}<table class="sortable classes" id="{table_id}"><thead>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _number(value: float | None, change: bool = False) -> str:
    if value is None:
        return '<td class="missing" data-sort="">—</td>'
    mark = (' class="up"' if value > 0 else ' class="down"' if value < 0 else "") if change else ""
    return (
        f'<td{mark} data-sort="{value:.4f}">{value:+.1f}</td>'
        if change
        else f'<td data-sort="{value:.4f}">{value:.1f}</td>'
    )


def _confusions(page: Page, run: dict) -> str:
    """One run's confusions, folded: the whole matrix of a small dataset, the most frequent pairs of a large one."""
    what = f"{run['method']}" + (f", {run['shots']} shots, seed {run['seed']}" if run["shots"] else "")
    summary = f"<summary>confusions of one run: {esc(what)}</summary>"
    links = f"<p class='note'>{page.link(run['run'], 'metrics.json', 'metrics.json')}</p>"
    pairs, classes = run.get("confusions"), run["per_class"]
    if pairs is None:
        body = "<p class='note'>Not recorded by the taskres that wrote this run; rerun it to see them.</p>"
    elif len(classes) <= MATRIX_MAX and run.get("confusions_complete"):
        body = _matrix(classes, pairs)
    else:
        body = _pairs(classes, pairs)
    return f"<details>{summary}{body}{links}</details>"


def _matrix(classes: list[dict], pairs: list) -> str:
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    for c, p in enumerate(classes):
        counts[c, c] = round((p["accuracy"] or 0.0) * p["n"] / 100)
    for t, p, n in pairs:
        counts[t, p] = n
    head = "<tr><th>true \\ predicted</th>" + "".join(
        f'<th title="{esc(p["class"])}">{c}</th>' for c, p in enumerate(classes)
    )
    body = []
    for c, p in enumerate(classes):
        total = max(int(p["n"]), 1)
        cells = "".join(
            f'<td style="background: rgba(47, 95, 158, {min(n / total, 1.0) * 0.6:.2f})">{n}</td>'
            if n
            else "<td>·</td>"
            for n in counts[c]
        )
        body.append(f"<tr><td>{esc(p['class'])} ({c})</td>{cells}</tr>")
    return f'<table class="confusion"><thead>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _pairs(classes: list[dict], pairs: list) -> str:
    rows = "".join(
        f"<tr><td>{esc(classes[t]['class'])}</td><td class='text'>{esc(classes[p]['class'])}</td><td>{n}</td>"
        f"<td>{100 * n / max(int(classes[t]['n']), 1):.1f}</td></tr>"
        for t, p, n in pairs[:SHOWN]
    )
    return (
        f"<p class='note'>The {min(SHOWN, len(pairs))} most frequent confusions.</p><table class='confusion'><thead>"
        "<tr><th>true class</th><th>predicted as</th><th>images</th><th>% of the class</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )
